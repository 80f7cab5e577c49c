"""ProxyV: the split layers' mask against the rules, the layer against an eager reference with that mask,
the spatial proxies against bilinear downsampling, the cache, training, FLOPs and checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from models import PROMPTS, build, make_inputs
from test_train import data_dir, train_argv  # noqa: F401  (fixture)

import leanvlm as lv
from leanvlm.cli.main import main
from leanvlm.methods import proxyv as proxyv_module
from leanvlm.registry import find_adapter

ADAPTERS = ["llava", "llava-next", "qwen2-vl", "qwen2.5-vl"]


def prepared(adapter, method, attn="sdpa", num_layers=5, image_size=None, seed=0):
    model, proc = build(adapter, attn, num_layers, image_size)
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    lv.prepare(model, method)
    return model, proc


@pytest.fixture
def captured(monkeypatch):
    """What the runner built (its layout) and computed (each split layer's inputs and outputs)."""
    seen = {"layouts": [], "layers": [], "initial": []}
    build_layout, split_layer = proxyv_module.build_layout, proxyv_module.split_layer
    initial = proxyv_module._Runner._initial_proxies

    def keep_layout(method, ctx):
        lay = build_layout(method, ctx)
        seen["layouts"].append((lay, ctx.state, ctx.hidden))
        return lay

    def keep_layer(parts, hidden, queries, cos, sin, allowed, **kw):
        out = split_layer(parts, hidden, queries, cos, sin, allowed, **kw)
        seen["layers"].append(
            dict(hidden=hidden, queries=queries, cos=cos, sin=sin, allowed=allowed, out=out)
        )
        return out

    def keep_initial(self, lay, hidden):
        out = initial(self, lay, hidden)
        seen["initial"].append((hidden, out))
        return out

    monkeypatch.setattr(proxyv_module, "build_layout", keep_layout)
    monkeypatch.setattr(proxyv_module, "split_layer", keep_layer)
    monkeypatch.setattr(proxyv_module._Runner, "_initial_proxies", keep_initial)
    return seen


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_start_layer_at_the_depth_is_the_baseline(adapter):
    method = lv.ProxyV(start_layer=5, reduce_factor=2)
    model, proc = prepared(adapter, method)
    inputs = make_inputs(proc, PROMPTS[:3])
    with torch.no_grad():
        base = model(**inputs).logits
        base_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with lv.apply(model, method), torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), base_tokens)


def test_the_no_op_needs_no_modules():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    with torch.no_grad():
        base = model(**inputs).logits
    with lv.apply(model, lv.ProxyV(start_layer=5)), torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)
    with pytest.raises(lv.ConfigError, match=r"lv.prepare\(model, method\)"):
        lv.apply(model, lv.ProxyV(start_layer=4))


def brute_force_allowed(model, inputs, lay, state):
    """allowed(q, k) from the rules, token by token: text / newline queries see the real tokens at or
    before them and no proxy; a proxy sees the real non-grid tokens before its image and the proxies up
    to itself; padding rows see themselves."""
    adapter = find_adapter(model)
    valid = inputs["attention_mask"].bool()
    visual = adapter.visual_mask(inputs["input_ids"], None) & valid
    ids = adapter.image_ids(visual, {**inputs, "has_input_ids": True})
    b, n = valid.shape
    grid = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        for image in sorted(set(ids[row].tolist()) - {-1}):
            slots = (ids[row] == image).nonzero()[:, 0]
            cells, _ = adapter.visual_layout(dict(inputs), image, len(slots))
            grid[row, slots[cells[:, 0] >= 0]] = True
    expected = torch.zeros_like(lay.allowed)
    p = lay.proxy_slot.shape[1]
    for row in range(b):
        queries = [j for j in range(n) if not grid[row, j]]
        proxies = [k for k in range(p) if k < lay.proxy_count[row]]
        first_of = {k: int((ids[row] == ids[row, lay.proxy_slot[row, k]]).nonzero()[0, 0]) for k in proxies}
        for qi, q in enumerate(queries):
            for k in range(n):
                expected[row, qi, k] = bool(valid[row, k]) and k <= q if valid[row, q] else k == q
        for qi in range(len(queries), lay.query_valid.shape[1]):
            expected[row, qi, lay.queries[row, qi]] = True  # a filler row
        for k in range(p):
            r = lay.query_valid.shape[1] + k
            if k not in proxies:
                expected[row, r, n + k] = True
                continue
            for j in range(n):
                expected[row, r, j] = bool(valid[row, j]) and not grid[row, j] and j < first_of[k]
            for k2 in proxies:
                expected[row, r, n + k2] = k2 <= k
    return expected


@pytest.mark.parametrize("adapter", ["llava-next", "qwen2-vl"])
def test_mask_equals_the_rules_on_a_padded_batch_with_several_tiles(adapter, captured):
    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    model, proc = prepared(adapter, method)
    # different image sizes (tile counts) per sample, two images in one, a text-only row
    inputs = make_inputs(proc, [PROMPTS[0], ("Compare the two pictures please.", 2), PROMPTS[2], ("Hi?", 0)])
    with lv.apply(model, method), torch.no_grad():
        model(**inputs)
    ((lay, state, _),) = captured["layouts"]
    assert len(set(lay.vis_count)) > 1 and lay.vis_count[3] == 0 and lay.proxy_count[3] == 0
    assert torch.equal(lay.allowed, brute_force_allowed(model, inputs, lay, state))
    assert torch.equal(state.order, torch.arange(state.order.shape[1]).expand_as(state.order))


def test_llava_next_proxies_per_tile():
    """Each tile its own grid: ceil(rows / r) x ceil(cols / r) cells of the tokens it holds after un-padding."""
    model, proc = build("llava-next")
    adapter = find_adapter(model)
    inputs = make_inputs(proc, [PROMPTS[1]])
    visual = adapter.visual_mask(inputs["input_ids"], None)
    cells, tiles = adapter.visual_layout(dict(inputs), 0, int(visual.sum()))
    assert tiles[0] == (4, 4) and len(tiles) > 1
    on_grid = cells[cells[:, 0] >= 0]
    expected = len({(t, y // 2, x // 2) for t, y, x in on_grid.tolist()})
    assert (cells[:, 0] < 0).sum() > 0  # row newlines are on no grid
    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    model, _ = prepared("llava-next", method)
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
    work = applied.trace.layer_work_counts(0)
    assert work[2][:2] == (len(on_grid), expected)


@pytest.mark.parametrize("r, image_size", [(2, 56), (4, 112), (2, 84)])
def test_spatial_proxies_are_bilinear_downsampling(r, image_size, captured):
    """The reference makes proxies with F.interpolate(bilinear, align_corners=False) where r divides the
    grid; a grid r does not divide (6x6 with r=4 is not tested: 84 px gives 6x6, r=2 divides it)."""
    method = lv.ProxyV(start_layer=2, reduce_factor=r)
    model, proc = prepared("llava", method, image_size=image_size)
    inputs = make_inputs(proc, PROMPTS[:2], image_size=image_size)
    with lv.apply(model, method), torch.no_grad():
        model(**inputs)
    hidden, proxies = captured["initial"][0]
    lay = captured["layouts"][0][0]
    side = image_size // 14
    for row in range(hidden.shape[0]):
        grid = hidden[row, lay.vis_slots[row]].T.reshape(1, -1, side, side)
        expected = F.interpolate(grid, size=(side // r, side // r), mode="bilinear", align_corners=False)
        expected = expected.reshape(-1, (side // r) ** 2).T
        torch.testing.assert_close(proxies[row, : lay.proxy_count[row]], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adapter", ["llava", "llava-next", "qwen2.5-vl"])
@pytest.mark.parametrize("proxy", ["spatial", "learned"])
def test_split_layer_equals_the_stock_layer_with_the_explicit_mask(adapter, proxy, captured):
    """Every split layer's query rows (text, newlines, proxies) equal the stock decoder layer run in eager
    mode over [sequence; proxies] with the mask as an additive 4-D mask (vision rows: themselves)."""
    method = lv.ProxyV(
        start_layer=2, reduce_factor=2, proxy=proxy, learned_proxies=3 if proxy == "learned" else None
    )
    model, proc = prepared(adapter, method, attn="eager")
    inputs = make_inputs(proc, PROMPTS[:3])
    with lv.apply(model, method), torch.no_grad():
        model(**inputs)
        layers = find_adapter(model).layers
        assert len(captured["layers"]) == 3
        for i, seen in enumerate(captured["layers"]):
            hidden, queries, allowed = seen["hidden"], seen["queries"], seen["allowed"]
            b, k = hidden.shape[:2]
            full = torch.eye(k, dtype=torch.bool).expand(b, k, k).clone()
            full.scatter_(1, queries[..., None].expand(-1, -1, k), allowed)
            mask = torch.zeros(b, 1, k, k).masked_fill(~full[:, None], torch.finfo(torch.float32).min)
            layer = layers[2 + i]
            out = type(layer).forward(
                layer, hidden, attention_mask=mask, position_embeddings=(seen["cos"], seen["sin"])
            )
            out = out[0] if isinstance(out, tuple) else out
            expected = out.gather(1, queries[..., None].expand(-1, -1, out.shape[-1]))
            torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_cache_after_prefill_has_the_baseline_length_and_decoding_is_stock(adapter):
    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    model, proc = prepared(adapter, method)
    inputs = make_inputs(proc, PROMPTS[:2])
    with torch.no_grad():
        base = model(**inputs, use_cache=True)
    base_cache = base.past_key_values
    with lv.apply(model, method), torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        n = inputs["input_ids"].shape[1]
        assert lv.compat.layer_lengths(cache) == [n] * 5
        for i in range(2):  # layers before the start layer are the baseline's
            torch.testing.assert_close(cache.layers[i].keys, base_cache.layers[i].keys)
        assert not torch.allclose(cache.layers[3].keys, base_cache.layers[3].keys)
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_trace_work_matches_the_schedule():
    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    model, proc = prepared("llava", method)
    inputs = make_inputs(proc, [PROMPTS[0]])
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
        report = lv.last_report(model)
    adapter = find_adapter(model)
    shape = type(adapter).model_shape(model.config)
    assert applied.trace.layer_work_counts(0) == method.layer_work(shape, [16])
    assert [lf.kv_only for lf in report.layers] == [0, 0, 16, 16, 16]
    assert [lf.extra for lf in report.layers] == [0, 0, 4, 4, 4]
    assert report.layers[2].total < report.layers[1].total  # the split layers cost less


@pytest.mark.parametrize("start, expected", [(12, 0.46), (16, 0.36)])
def test_flops_reproduce_the_papers_prefill_reduction(start, expected, capsys):
    """Vicuna-7B, 5 crops of 576 tokens + 50 text tokens: the paper's -46% (S=12) / -36% (S=16) prefill
    FLOPs; ours counts the LLM layers (within 2 points)."""
    argv = ["flops", "--preset", "llava-1.5-7b", "--images", "5", "--text-tokens", "50", "--json"]
    assert main([*argv, "--method", f"proxyv:start_layer={start}"]) == 0
    row = json.loads(capsys.readouterr().out)["methods"][0]
    assert abs((1 - row["llm_ratio"]) - expected) < 0.02
    layer = row["layers"][start]
    assert layer["visual"] == 2880


def test_apply_without_modules_says_how_to_create_them():
    model, proc = build("llava")
    with pytest.raises(lv.ConfigError, match=r"lv.prepare\(model, method\).*lv.load_modules"):
        lv.apply(model, lv.ProxyV(start_layer=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start_layer=0), "start_layer=0 must be an integer >= 1"),
        (dict(reduce_factor=0), "reduce_factor=0 must be an integer >= 1"),
        (dict(proxy="grid"), "proxy='grid' is not one of"),
        (dict(learned_proxies=4), r"learned_proxies=4 is for proxy='learned' \(proxy='spatial'\)"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(lv.ConfigError, match=message):
        lv.ProxyV(**kwargs)


def test_start_layer_beyond_the_model_is_refused():
    method = lv.ProxyV(start_layer=6)
    model, _ = build("llava")
    with pytest.raises(lv.ConfigError, match=r"start_layer=6 is outside \[1, 5\]"):
        lv.apply(model, method)


def test_modules_save_and_load_and_refuse_another_shape(tmp_path):
    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    model, proc = prepared("llava", method, seed=3)
    inputs = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, method), torch.no_grad():
        expected = model(**inputs).logits
    lv.save_modules(model, tmp_path)
    fresh, _ = build("llava")
    fresh = copy.deepcopy(fresh)
    lv.load_modules(fresh, tmp_path, method)
    with lv.apply(fresh, method), torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
    other, _ = build("llava", num_layers=4)
    with pytest.raises(lv.ConfigError, match="another shape"):
        lv.load_modules(copy.deepcopy(other), tmp_path, method)


def test_training_steps_lower_the_loss_and_change_only_the_modules(data_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    argv = train_argv(
        data_dir,
        out,
        "proxyv:start_layer=2,reduce_factor=2",
        "--lr",
        "1e-5",
        "--modules-lr",
        "3e-3",
        "--train-parts",
        "modules",
    )
    assert main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 8 and sum(losses[-4:]) < sum(losses[:4])  # two passes over both batches each
    from safetensors.torch import load_file

    from leanvlm.presets import build_preset

    base, _ = build_preset("tiny", seed=0)
    trained = type(base).from_pretrained(out).state_dict()
    state = base.state_dict()
    assert trained.keys() == state.keys()
    assert all(torch.equal(trained[k], state[k]) for k in state)  # the base model did not move
    modules = load_file(out / "leanvlm_modules.safetensors")
    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    fresh, _ = build_preset("tiny", seed=0)
    torch.manual_seed(0)
    before = lv.prepare(fresh, method)[method.module_key()].state_dict()
    changed = [k for k, v in before.items() if not torch.equal(modules[f"{method.module_key()}.{k}"], v)]
    assert changed  # the modules trained
    # a second stage from the first's output folder starts from its trained modules (lr 0: they stay)
    stage2 = tmp_path / "stage2"
    argv2 = [
        "train",
        "--model",
        str(out),
        "--data",
        str(data_dir / "data.json"),
        "--output-dir",
        str(stage2),
        "--max-steps",
        "1",
        "--lr",
        "0",
        "--method",
        "proxyv:start_layer=2,reduce_factor=2",
        "--no-progress",
    ]
    assert main(argv2) == 0
    again = load_file(stage2 / "leanvlm_modules.safetensors")
    assert again.keys() == modules.keys() and all(torch.equal(again[k], modules[k]) for k in modules)


def test_learned_proxies_follow_a_reduction_before_the_llm_and_spatial_ones_refuse():
    """The paper combines learned proxies with VisionZip (no grid is left); spatial proxies need one."""
    learned = lv.ProxyV(start_layer=2, reduce_factor=2, proxy="learned", learned_proxies=2)
    model, proc = prepared("llava", learned)
    inputs = make_inputs(proc, PROMPTS[:2])
    zip_ = lv.VisionZip(dominant=4, contextual=1)
    with lv.apply(model, zip_, learned) as applied, torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    assert applied.trace.layer_work_counts(0)[2][:2] == (5, 2)  # 4 dominant + 1 contextual, 2 proxies
    spatial = lv.ProxyV(start_layer=2, reduce_factor=2)
    lv.prepare(model, spatial)
    with (
        lv.apply(model, zip_, spatial),
        torch.no_grad(),
        pytest.raises(lv.ConfigError, match="proxy='learned'"),
    ):
        model(**inputs)


@pytest.mark.parametrize("adapter", ["llava-next", "qwen2-vl"])
def test_beam_copies_get_their_own_samples_layout(adapter, captured):
    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    model, proc = prepared(adapter, method)
    inputs = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, method), torch.no_grad():
        model.generate(**inputs, num_beams=2, num_return_sequences=2, max_new_tokens=3, do_sample=False)
        lay = captured["layouts"][0][0]
        assert lay.allowed.shape[0] == 4
        for row in range(4):
            assert torch.equal(lay.allowed[row], lay.allowed[row - row % 2])
        assert lay.vis_count[0] != lay.vis_count[2]  # the two samples' images differ
        model(**make_inputs(proc, PROMPTS[1:2]))  # the second sample alone
    assert captured["layouts"][1][0].vis_count[0] == lay.vis_count[2]
    assert captured["layouts"][1][0].proxy_count[0] == lay.proxy_count[2]


def test_activation_checkpointing_recomputes_the_split_layers_with_equal_gradients(data_dir, captured):  # noqa: F811
    from test_train import batch_of, checkpointing_grads

    from leanvlm.presets import build_preset

    method = lv.ProxyV(start_layer=2, reduce_factor=2)
    model, proc = build_preset("tiny", num_layers=5)
    torch.manual_seed(0)
    lv.prepare(model, method)
    calls = []
    grads = checkpointing_grads(
        model, method, batch_of(proc, data_dir), lambda: calls.append(len(captured["layers"]))
    )
    calls.append(len(captured["layers"]))
    assert any("leanvlm_modules" in n for n in grads[False])
    assert calls[1] - calls[0] == 3  # three split layers
    if True in grads:
        assert calls[2] - calls[1] == 6  # recomputed in the backward pass
