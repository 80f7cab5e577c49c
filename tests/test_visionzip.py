"""VisionZip: the dominant tokens against the vision tower's own eager attentions, the contextual tokens
against the reference's arithmetic written out by hand, LLaVA-NeXT's per-tile layout against the model's
own packing, budgets, composition and the cost in ``leanvlm flops``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm.cli.main import main


def reference_selection(model, inputs, dominant: int, contextual: int):
    """Per image of the batch: (kept patch indices 0..N-1 sorted, {target patch: its LLM input feature}),
    by the reference's algorithm on the tower's eager attentions and keys of the feature layer."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")  # attention probabilities out of the stock layers
    layers = tower.encoder.layers
    j = model.config.vision_feature_layer % (len(layers) + 1) - 1
    keys = {}
    attn = layers[j].self_attn
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: keys.setdefault("k", out.detach()))
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    hook.remove()
    feats = out.hidden_states[j + 1]  # the feature layer's output (hidden_states[-2])
    probs = out.attentions[j]  # [images, heads, N+1, N+1]
    k = keys["k"].view(*keys["k"].shape[:2], attn.num_heads, attn.head_dim).mean(2)  # head-mean keys
    result = []
    for g in range(feats.shape[0]):
        cls = probs[g, :, 0, 1:].sum(0)  # CLS -> patches, summed over heads
        order = sorted(range(cls.numel()), key=lambda p: (-round(float(cls[p]) / 1e-6), p))
        dom = sorted(order[:dominant])
        rest = [p for p in range(cls.numel()) if p not in dom]
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        others = [p for p in rest if p not in targets]
        unit = torch.nn.functional.normalize(k[g, 1:], dim=-1)
        groups = {t: [] for t in targets}
        for p in others:
            sims = [round(float(unit[p] @ unit[t]) / 1e-6) for t in targets]
            groups[targets[sims.index(max(sims))]].append(p)
        merged = {}
        for t, members in groups.items():
            h = feats[g, 1 + t].float()
            if members:
                h = h + feats[g, [1 + p for p in members]].float().mean(0)
            merged[t] = model.model.multi_modal_projector(h[None].to(feats.dtype))[0]
        result.append((sorted(dom + targets), merged))
    return result


def llm_inputs_under(model, method, inputs):
    """(the embeddings the first decoder layer receives, the trace) with ``method`` applied."""
    seen = {}
    with lv.apply(model, method) as applied:

        def grab(module, args, kwargs):
            seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).detach())

        hook = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        return seen["h"], applied.trace


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("prompt", [PROMPTS[1], PROMPTS[3]], ids=["one-image", "two-images"])
def test_selection_and_merge_equal_the_reference_on_eager_attentions(attn, prompt):
    model, proc = build("llava", attn=attn, num_layers=3)
    inputs = make_inputs(proc, [prompt])
    expected = reference_selection(model, inputs, 4, 3)
    hidden, trace = llm_inputs_under(model, lv.VisionZip(dominant=4, contextual=3), inputs)
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0]
    slots = visual.nonzero()[:, 0].tolist()
    images = [slots[i : i + 16] for i in range(0, len(slots), 16)]
    want, merged = [], {}
    for image, (patches, features) in zip(images, expected, strict=True):
        want += [image[p] for p in patches]
        merged.update({image[t]: feat for t, feat in features.items()})
    assert trace.kept_visual[-1][0].tolist() == want
    assert len(want) == 7 * len(images)  # exactly D + C per image
    kept = sorted([j for j in range(visual.numel()) if not visual[j]] + want)  # the LLM's sequence
    assert hidden.shape[1] == len(kept)
    for slot, feat in merged.items():  # a contextual token: its target plus the mean of what joined it
        torch.testing.assert_close(hidden[0, kept.index(slot)], feat, atol=1e-5, rtol=1e-4)


def test_dominant_are_the_top_cls_attended():
    """With no contextual tokens the kept tokens are exactly the D patches the CLS row attends to most."""
    model, proc = build("llava", num_layers=3)
    inputs = make_inputs(proc, [PROMPTS[1]])
    expected = reference_selection(model, inputs, 6, 1)[0][0]
    _, trace = llm_inputs_under(model, lv.VisionZip(dominant=6, contextual=0), inputs)
    slots = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0].nonzero()[:, 0]
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True)
    cls = out.attentions[-2][0, :, 0, 1:].sum(0)
    top = set(torch.topk(cls, 6).indices.tolist())
    kept = {int((slots == s).nonzero()) for s in trace.kept_visual[-1][0].tolist()}
    assert kept == top
    assert len(expected) == 7 and set(expected) >= top  # (the reference's D=6 plus a contextual target)


def test_llava_next_layout_matches_the_models_packing_and_counts_per_tile():
    model, proc = build("llava-next", num_layers=3)
    inputs = make_inputs(proc, PROMPTS)
    adapter = lv.registry.find_adapter(model)
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiles = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in inputs["image_sizes"].tolist()
    ]
    sources = adapter.feature_sources({"image_sizes": inputs["image_sizes"]}, sum(tiles))
    feats, first = [], 0
    for n in tiles:  # features that carry their own (tile, token) so the packing can be read back
        f = torch.zeros(n, side * side, cfg.text_config.hidden_size)
        f[..., 0] = torch.arange(first, first + n)[:, None].float()
        f[..., 1] = torch.arange(1, 1 + side * side)[None].float()
        feats.append(f)
        first += n
    newline = torch.full((cfg.text_config.hidden_size,), -1.0)
    packed, _ = model.model.pack_image_features(feats, inputs["image_sizes"], "default", newline)
    for mine, theirs in zip(sources, packed, strict=True):
        assert torch.equal(mine, theirs[:, :2].long())
    method = lv.VisionZip(dominant=3, contextual=2)
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
        per_layer = applied.trace.visual_per_layer
    per_image = iter(tiles)
    for b, (_, n_images) in enumerate(PROMPTS):  # D + C of every tile (base view included), no newlines
        want = sum(5 * next(per_image) for _ in range(n_images))
        assert per_layer[b] == [want] * 3


def test_refused_on_qwen_and_bad_budgets():
    model, _ = build("qwen2-vl", num_layers=3)
    with pytest.raises(lv.UnsupportedModelError, match="VisionZip: .*LlavaForConditionalGeneration"):
        lv.apply(model, lv.VisionZip())
    llava, proc = build("llava", num_layers=3)
    inputs = make_inputs(proc, [PROMPTS[0]])
    with (
        lv.apply(llava, lv.VisionZip(dominant=10, contextual=7)),
        pytest.raises(
            lv.ConfigError,
            match=r"VisionZip: dominant \+ contextual = 10 \+ 7 is more than an image \(tile\) of this "
            r"input has \(16 visual tokens\); allowed: dominant \+ contextual <= 16",
        ),
    ):
        llava(**inputs)
    for make, message in [
        (lambda: lv.VisionZip(dominant=0), r"VisionZip: dominant=0 must be an int >= 1"),
        (lambda: lv.VisionZip(contextual=-1), r"VisionZip: contextual=-1 must be an int >= 0"),
        (lambda: lv.parse_method("visionzip:positions=mid"), r"VisionZip: positions='mid' is not one of"),
    ]:
        with pytest.raises(lv.ConfigError, match=message):
            make()


def test_composes_with_an_in_llm_method_and_not_with_another_pre_llm_one():
    model, proc = build("llava", num_layers=4)
    inputs = make_inputs(proc, [PROMPTS[0]])
    with lv.apply(
        model, lv.FastV(layer=2, keep_ratio=0.5), lv.VisionZip(dominant=4, contextual=2)
    ) as applied:
        with torch.no_grad():
            model(**inputs)
        assert applied.trace.visual_per_layer == [[6, 6, 3, 3]]  # FastV's share is of the 6 that entered
        summary = lv.last_report(model).summary()
    assert (
        summary["visual_tokens_in"] == 16 and summary["selection_flops"] > 0 and summary["scoring_flops"] > 0
    )
    with pytest.raises(lv.IncompatibleMethodsError, match="before the LLM .*got VisionZip, DivPrune"):
        lv.apply(model, lv.DivPrune(), lv.VisionZip())


def test_flops_command_counts_the_selection(capsys):
    assert main(["flops", "--method", "visionzip", "--json"]) == 0
    (m,) = json.loads(capsys.readouterr().out)["methods"]
    assert m["visual_tokens_in"] == 576 and m["layers"][0]["visual"] == 64 and m["layers"][-1]["visual"] == 64
    n, d, dh, others, c = 577, 1024, 64, 576 - 64, 10
    projector = 2 * 1024 * 4096 + 2 * 4096 * 4096
    expected = 2 * d * d + 2 * n * d * d + 2 * n * d + n * d
    expected += 3 * n * dh + 2 * others * c * dh + (others + c) * d + c * projector
    assert m["selection_flops"] == expected


def test_budget_as_a_share():
    assert lv.VisionZip(keep_ratio=64 / 576).counts(576) == (54, 10)  # the reference's split
    assert lv.VisionZip(keep_ratio=128 / 576).counts(576) == (108, 20)
    assert lv.VisionZip(keep_ratio=1.0).counts(16) == (16, 0) and lv.VisionZip(keep_ratio=1.0).is_noop
    assert lv.VisionZip(keep_ratio=0.01).counts(16) == (1, 0)  # at least one token
    assert lv.VisionZip.at_budget(0.25, 32) == lv.VisionZip(keep_ratio=0.25)
    with pytest.raises(lv.ConfigError, match=r"VisionZip: keep_ratio=0 is outside \(0, 1\]"):
        lv.VisionZip(keep_ratio=0)
