"""CrossGET: the matching and the ensemble on hand-made inputs, proportional attention, the tower's layers
against the stock ones, the LLM's view, training, FLOPs, checkpoints and the refused models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import PROMPTS, build, make_inputs
from test_train import data_dir, train_argv  # noqa: F401  (fixture)

import leanvlm as lv
from leanvlm import compat
from leanvlm.cli.main import main
from leanvlm.methods import crossget as crossget_module
from leanvlm.ops.merge import complete_graph_match, ensemble_merge
from leanvlm.registry import find_adapter


def unit(*vectors):
    return torch.tensor(vectors, dtype=torch.float32)[None]


def test_matching_picks_the_redundant_unimportant_token_and_its_twin():
    # tokens 1 and 2 are near twins, 3 is orthogonal to everything, 0 and 4 are protected (CLS, cross)
    metric = unit([1, 0, 0], [0, 1, 0], [0, 0.99, 0.14], [0, 0, 1], [1, 1, 1])
    protected = torch.tensor([True, False, False, False, True])
    # both twins rank first on similarity; the triangular mask lets the first of them (1) pair with the
    # second, not the other way round: with similar importances 1 is the source, into 2
    src, dst, keep = complete_graph_match(metric, torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0]]), 1, protected)
    assert src.tolist() == [[1]] and dst.tolist() == [[2]] and keep.tolist() == [[0, 2, 3, 4]]
    # an important token 1 is kept: 2 (scored against 3 only) becomes the source, into its twin 1
    src, dst, keep = complete_graph_match(metric, torch.tensor([[0.5, 2.0, 0.1, 0.1, 0.0]]), 1, protected)
    assert src.tolist() == [[2]] and dst.tolist() == [[1]] and keep.tolist() == [[0, 1, 3, 4]]
    # 3 is ranked last (no later token to pair with): never a source, whatever its importance
    src, _, _ = complete_graph_match(metric, torch.tensor([[0.5, 2.0, 2.0, -5.0, 0.0]]), 1, protected)
    assert src.tolist() != [[3]]


def test_matching_never_merges_two_tokens_into_each_other_and_protects_cls_and_cross():
    torch.manual_seed(0)
    metric = torch.randn(3, 12, 8)
    importance = torch.rand(3, 12)
    protected = torch.zeros(12, dtype=torch.bool)
    protected[[0, 11]] = True
    src, dst, keep = complete_graph_match(metric, importance, 5, protected)
    for b in range(3):
        sources = set(src[b].tolist())
        assert not sources & {0, 11} and not sources & set(dst[b].tolist())
        assert sorted(sources | set(keep[b].tolist())) == list(range(12))
        assert keep[b].tolist() == sorted(keep[b].tolist())


def test_ensemble_weights_sizes_and_order():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    importance = torch.tensor([[0.0, 0.2, 0.0, 0.7]])
    # token 3 merges into token 1
    out, new_size = ensemble_merge(
        x, size, importance, torch.tensor([[3]]), torch.tensor([[1]]), torch.tensor([[0, 1, 2]])
    )
    w = torch.softmax(torch.tensor([0.7, 0.2]), 0) * 2  # (source, destination)
    expected = (w[0] * x[0, 3] * 1 + w[1] * x[0, 1] * 1) / 2
    torch.testing.assert_close(out[0, 1], expected)
    torch.testing.assert_close(out[0, [0, 2]], x[0, [0, 2]])
    assert new_size.tolist() == [[1.0, 2.0, 3.0]] and new_size.sum() == size.sum()


def test_sizes_sum_to_the_original_count_through_the_tower(monkeypatch):
    seen = {}
    run = crossget_module._Tower.run

    def keep(self, vctx, i, layer, hidden, call_layer):
        out = run(self, vctx, i, layer, hidden, call_layer)
        seen[i] = vctx.store[crossget_module.STATE]["size"].clone()
        return out

    monkeypatch.setattr(crossget_module._Tower, "run", keep)
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, lv.CrossGET(merge_per_layer=3)), torch.no_grad():
        model(**inputs)
    for size in seen.values():
        assert torch.equal(size.sum(-1), torch.full((size.shape[0],), 18.0))  # CLS + 16 patches + cross
    assert seen[1].shape[1] == 12


@pytest.mark.parametrize("sizes", ["ones", "mixed"])
def test_proportional_attention_layer_equals_an_eager_reference(sizes):
    """A tower layer computed by the runner (no merge) equals the stock layer with log(size) added to the
    attention logits of every key (with all sizes 1: the stock layer itself)."""
    model, _ = build("llava")
    adapter = find_adapter(model)
    layer = adapter.vision_layers[0]
    torch.manual_seed(0)
    x = torch.randn(2, 18, model.config.vision_config.hidden_size)
    size = torch.ones(2, 18) if sizes == "ones" else torch.randint(1, 5, (2, 18)).float()
    tower = crossget_module._Tower(lv.CrossGET(merge_per_layer=0), adapter, None, 0)
    out, _, _ = tower._layer(layer, x, size, 0)
    bias = size.log()[:, None, None, :].expand(2, 1, 18, 18)
    with torch.no_grad():
        compat.set_attn_implementation(model, "eager")
        expected = layer(x, bias)
        compat.set_attn_implementation(model, "sdpa")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_llm_sees_the_merged_tokens_and_the_cross_token():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    method = lv.CrossGET(merge_per_layer=3)
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
    trace = applied.trace
    # 16 patches + CLS + cross = 18 -> 15 after layer 0 (the feature layer of the 2-layer tower)
    assert trace.visual_per_layer[0] == [13] * 5
    assert trace.tower_tokens == {0: (18, 15), 1: (15, 12)}
    n_text = int(inputs["attention_mask"][0].sum()) - 16
    assert trace.tokens_per_layer[0] == [n_text + 13 + 1] * 5  # + the cross token
    kept = trace.kept_visual[-1][0]
    assert kept.tolist() == sorted(kept.tolist())


def test_training_free_equals_zero_modules_and_apply_needs_no_prepare():
    model, proc = build("llava")
    model = copy.deepcopy(model)
    inputs = make_inputs(proc, PROMPTS[:2])
    method = lv.CrossGET(merge_per_layer=3)
    with lv.apply(model, method), torch.no_grad():
        free = model(**inputs).logits
    lv.prepare(model, method)
    with lv.apply(model, method), torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, free, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lv.modules.modules_for(model, method).cross_text[2].fill_(0.3)
    with lv.apply(model, method), torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, free, atol=1e-3)


def test_distillation_loss_is_added_in_training():
    model, proc = build("llava")
    model = copy.deepcopy(model)
    inputs = make_inputs(proc, PROMPTS[:2])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # the prompt's last tokens, as an answer
    method = lv.CrossGET(merge_per_layer=3, kd_weight=10.0)
    lv.prepare(model, method)
    with torch.no_grad():
        lv.modules.modules_for(model, method).cross_text.normal_(0, 1.0)
    losses = {}
    for weight in (0.0, 10.0):
        m = lv.CrossGET(merge_per_layer=3, kd_weight=weight)
        with lv.apply(model, m), torch.no_grad():
            losses[weight] = float(model(**inputs, labels=labels).loss)
    assert losses[10.0] > losses[0.0] + 1e-4


@pytest.mark.parametrize("adapter", ["llava-next", "qwen2-vl", "qwen2.5-vl"])
def test_other_models_are_refused_naming_the_supported_one(adapter):
    model, _ = build(adapter)
    with pytest.raises(lv.UnsupportedModelError, match="supported: LlavaForConditionalGeneration"):
        lv.apply(model, lv.CrossGET())


def test_bad_settings():
    with pytest.raises(lv.ConfigError, match="merge_per_layer=-1"):
        lv.CrossGET(merge_per_layer=-1)
    with pytest.raises(lv.ConfigError, match="kd_weight"):
        lv.CrossGET(kd_weight=-1.0)


def test_flops_show_the_tower_and_the_llm_saving(capsys):
    """LLaVA-1.5-7B: 577 + 1 tokens through the tower, 13 fewer per layer; 277 merged + the cross token
    reach the LLM (the reference's 278)."""
    argv = ["flops", "--preset", "llava-1.5-7b", "--json", "--method", "none", "--method", "crossget"]
    assert main(argv) == 0
    base, row = json.loads(capsys.readouterr().out)["methods"]
    assert row["visual_tokens_last_layer"] == 277 and row["layers"][0]["tokens"] == 64 + 278
    assert row["vision_flops"] < 0.8 * base["vision_flops"]
    assert row["llm_flops"] < 0.55 * base["llm_flops"]
    method = lv.CrossGET()
    schedule = method.tower_schedule(lv.flops.VisionShape(24, 1024, 4096, 577, 14))
    assert schedule[0] == (578, 565) and schedule[22] == (292, 279)


def test_modules_save_load_and_another_shape_is_refused(tmp_path):
    method = lv.CrossGET(merge_per_layer=3)
    model, proc = build("llava")
    model = copy.deepcopy(model)
    lv.prepare(model, method)
    with torch.no_grad():
        lv.modules.modules_for(model, method).cross_image.normal_()
    lv.save_modules(model, tmp_path)
    other = copy.deepcopy(build("llava")[0])
    lv.load_modules(other, tmp_path, method)
    assert torch.equal(
        lv.modules.modules_for(other, method).cross_image, lv.modules.modules_for(model, method).cross_image
    )
    smaller = copy.deepcopy(build("llava", num_layers=4)[0])
    with pytest.raises(lv.ConfigError, match="another shape"):
        lv.load_modules(smaller, tmp_path, method)


def test_training_steps_lower_the_loss_and_change_only_the_cross_tokens(data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    argv = train_argv(
        data_dir, out, "crossget:merge_per_layer=3,kd_weight=0.1", "--lr", "1e-2", "--train-parts", "modules"
    )
    assert main(argv) == 0
    losses = json.loads((out / "train_summary.json").read_text())["losses"]
    assert len(losses) == 8 and sum(losses[-4:]) < sum(losses[:4])
    from safetensors.torch import load_file

    from leanvlm.presets import build_preset

    base, _ = build_preset("tiny", seed=0)
    trained = type(base).from_pretrained(out).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in base.state_dict().items())
    modules = load_file(out / "leanvlm_modules.safetensors")
    assert modules["CrossGET.cross_image"].abs().sum() > 0 and modules["CrossGET.cross_text"].abs().sum() > 0


def test_activation_checkpointing_gives_equal_cross_token_gradients(data_dir):  # noqa: F811
    from test_train import batch_of, checkpointing_grads

    from leanvlm.presets import build_preset

    method = lv.CrossGET(merge_per_layer=3, kd_weight=0.1)
    model, proc = build_preset("tiny", num_layers=5)
    lv.prepare(model, method)
    with torch.no_grad():
        lv.modules.modules_for(model, method).cross_text.normal_(0, 0.1)
    grads = checkpointing_grads(model, method, batch_of(proc, data_dir))[False]
    assert grads["leanvlm_modules.CrossGET.cross_image"].abs().sum() > 0
    assert grads["leanvlm_modules.CrossGET.cross_text"].abs().sum() > 0
