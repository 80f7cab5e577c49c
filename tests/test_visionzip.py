"""VisionZip: the dominant tokens against the vision tower's own eager attentions, the contextual tokens
against the reference's arithmetic written out by hand, LLaVA-NeXT's per-tile layout against the model's
own packing, budgets, composition and the cost in ``leanvlm flops``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import PROMPTS, build, llm_input, make_inputs

import leanvlm as lv
from leanvlm.cli.main import main


def record(store: dict, key: str, pick):
    """A hook that keeps ``pick(hook arguments)`` under ``key`` the first time it runs (and changes nothing)."""

    def hook(*args):
        store.setdefault(key, pick(*args))

    return hook


def reference_selection(model, inputs, dominant: int, contextual: int):
    """Per image of the batch: (kept patch indices 0..N-1 sorted, {target patch: its LLM input feature}),
    by the reference's algorithm on the tower's eager attentions and keys of the feature layer."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")  # attention probabilities out of the stock layers
    layers = tower.encoder.layers
    j = model.config.vision_feature_layer % (len(layers) + 1) - 1
    keys = {}
    attn = layers[j].self_attn
    hook = attn.k_proj.register_forward_hook(record(keys, "k", lambda m, a, out: out.detach()))
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


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def qwen_reference(model, inputs, dominant: int, contextual: int):
    """Per frame of the batch's images (raster order of merged tokens): (kept, {target: feature}) by our
    substitute written out plainly: attention received in the last full-attention block (from the
    block's own q/k, RoPE applied by hand, softmax per frame), summed per 2x2 group, keys (no RoPE)
    averaged; the raster order read off the merger's own output."""
    visual = model.model.visual
    full = getattr(visual, "fullatt_block_indexes", None)
    block = visual.blocks[max(full) if full else len(visual.blocks) - 1]
    seen = {}
    h1 = block.attn.qkv.register_forward_hook(record(seen, "qkv", lambda m, a, out: out.detach()))
    h2 = block.register_forward_pre_hook(
        record(seen, "rope", lambda m, a, kw: kw["position_embeddings"]), with_kwargs=True
    )
    h3 = visual.merger.register_forward_pre_hook(record(seen, "last", lambda m, a: a[0].detach()))
    with torch.no_grad():
        pooled = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    for h in (h1, h2, h3):
        h.remove()
    heads = block.attn.num_heads
    q, k, _ = seen["qkv"].view(seen["qkv"].shape[0], 3, heads, -1).unbind(1)  # [P, H, Dh]
    cos, sin = (t.float()[:, None] for t in seen["rope"])
    q_rot, k_rot = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    with torch.no_grad():
        merged = visual.merger(seen["last"])
    # block order -> raster: the merger's output row j is the model's pooled row perm[j]
    perm = [int((pooled - row).abs().sum(-1).argmin()) for row in merged]
    assert sorted(perm) == list(range(len(perm)))
    unit, out, start = 4, [], 0
    received = torch.zeros(q.shape[0])
    for t, h, w in inputs["image_grid_thw"].tolist():
        for _ in range(t):
            p = h * w
            scores = torch.einsum("qhd,khd->hqk", q_rot[start : start + p], k_rot[start : start + p])
            probs = torch.softmax(scores * block.attn.scaling, -1)
            received[start : start + p] = probs.mean(dim=(0, 1))
            start += p
    importance = torch.zeros(len(perm))
    keys = torch.zeros(len(perm), k.shape[-1])
    for j, r in enumerate(perm):
        importance[r] = received[unit * j : unit * j + unit].sum()
        keys[r] = k[unit * j : unit * j + unit].mean(dim=(0, 1))
    o = 0
    for t, h, w in inputs["image_grid_thw"].tolist():
        for _ in range(t):
            m = h * w // unit
            imp, key = importance[o : o + m], torch.nn.functional.normalize(keys[o : o + m], dim=-1)
            order = sorted(range(m), key=lambda i: (-round(float(imp[i]) / 1e-6), i))
            dom = sorted(order[:dominant])
            rest = [i for i in range(m) if i not in dom]
            targets = rest[:: max(1, len(rest) // contextual)][:contextual]
            groups = {t_: [] for t_ in targets}
            for i in rest:
                if i not in targets:
                    sims = [round(float(key[i] @ key[t_]) / 1e-6) for t_ in targets]
                    groups[targets[sims.index(max(sims))]].append(i)
            out.append((sorted(dom + targets), groups, o))
            o += m
    return out


@pytest.mark.parametrize("adapter", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_substitute_equals_the_plain_computation(adapter):
    """Two images; at 224 px Qwen2.5-VL's blocks see the 8x8 merged grid in four attention windows."""
    model, proc = build(adapter, num_layers=3, image_size=224)
    inputs = make_inputs(proc, [PROMPTS[3]], image_size=224)
    expected = qwen_reference(model, inputs, dominant=5, contextual=3)
    embeds = llm_input(model, inputs)[0]
    hidden, trace = llm_inputs_under(model, lv.VisionZip(dominant=5, contextual=3), inputs)
    slots = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0].nonzero()[:, 0].tolist()
    want, merged = [], {}
    for kept, groups, first in expected:
        want += [slots[first + i] for i in kept]
        for target, members in groups.items():
            feat = embeds[slots[first + target]].float()
            if members:
                feat = feat + embeds[[slots[first + i] for i in members]].float().mean(0)
            merged[slots[first + target]] = feat
    assert trace.kept_visual[-1][0].tolist() == want and len(want) == 8 * len(expected)
    kept = sorted([j for j in range(embeds.shape[0]) if j not in slots] + want)
    for slot, feat in merged.items():
        torch.testing.assert_close(hidden[0, kept.index(slot)].float(), feat, atol=1e-5, rtol=1e-4)


def test_qwen_images_and_video_frames_in_one_call():
    """An image and a 2-frame video (the image's patches) in one prompt: the image keeps D + C, each
    frame D + C; cached generation equals uncached."""
    model, proc = build("qwen2-vl", num_layers=3)
    image = make_inputs(proc, [PROMPTS[0]])
    tok = proc.tokenizer
    image_id, video_id = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    ids = image["input_ids"][0]
    n = int((ids == image_id).sum())
    first = int((ids == image_id).nonzero()[0, 0])
    frames = torch.full((2 * n,), video_id)  # a clip of two frames, each with the image's grid
    new_ids = torch.cat([ids[: first + n], ids[first - 1 : first], frames, ids[first + n :]])[None]
    grid = image["image_grid_thw"].clone()
    video_grid = grid.clone()
    video_grid[0, 0] = 2
    pixels = image["pixel_values"]
    inputs = {
        "input_ids": new_ids,
        "attention_mask": torch.ones_like(new_ids),
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "pixel_values_videos": torch.cat([pixels, pixels]),
        "video_grid_thw": video_grid,
        "mm_token_type_ids": (new_ids == image_id).to(torch.int32)
        + 2 * (new_ids == video_id).to(torch.int32),
    }
    with lv.apply(model, lv.VisionZip(dominant=2, contextual=1)) as applied:
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        per_layer = applied.trace.visual_per_layer[0]
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert per_layer == [3 * 3] * 3  # the image and each of the two frames: 2 + 1
    assert torch.equal(cached, uncached)


def test_qwen_window_order_is_the_models():
    """Qwen2.5-VL: the blocks' group j is the merger's output row window_index[j] (compat)."""
    from leanvlm import compat

    model, proc = build("qwen2.5-vl", num_layers=3, image_size=224)
    inputs = make_inputs(proc, [PROMPTS[0]], image_size=224)
    visual = model.model.visual
    seen = {}
    hook = visual.merger.register_forward_pre_hook(record(seen, "last", lambda m, a: a[0].detach()))
    with torch.no_grad():
        pooled = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        merged = visual.merger(seen["last"])
    hook.remove()
    index = compat.qwen_window_index(visual, inputs["image_grid_thw"])
    assert not torch.equal(index, torch.arange(len(index)))  # windows do reorder at this size
    torch.testing.assert_close(pooled[index], merged)
    assert (
        compat.qwen_window_index(build("qwen2-vl", num_layers=3)[0].model.visual, inputs["image_grid_thw"])
        is None
    )


def test_refused_when_the_features_are_the_last_layers_or_there_is_no_cls():
    model = copy.deepcopy(build("llava", num_layers=3)[0])
    model.config.vision_feature_layer = -1
    with pytest.raises(
        lv.UnsupportedModelError,
        match=r"VisionZip: .*the vision tower's last layer \(1 of 0..1\).*before the last",
    ):
        lv.apply(model, lv.VisionZip())
    model.config.vision_feature_layer = -3  # the embeddings of a 2-layer tower
    with pytest.raises(lv.UnsupportedModelError, match=r"VisionZip: .*the vision tower's embeddings"):
        lv.apply(model, lv.VisionZip())
    model.config.vision_feature_layer = -2
    del model.model.vision_tower.embeddings.class_embedding  # a tower without a CLS token (as SigLIP)
    with pytest.raises(
        lv.UnsupportedModelError, match=r"VisionZip: .* has no CLS token .*supported: towers with"
    ):
        lv.apply(model, lv.VisionZip())


def test_bad_budgets():
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


def test_runtime_cost_equals_the_schedules():
    model, proc = build("llava", num_layers=3)
    inputs = make_inputs(proc, [PROMPTS[3]])  # two images
    method = lv.VisionZip(dominant=3, contextual=2)
    with lv.apply(model, method), torch.no_grad():
        model(**inputs)
        report = lv.last_report(model)
    shape = lv.registry.find_adapter(model).model_shape(model.config)
    assert report.selection == method.selection_flops(shape, [16, 16], 0) > 0
    qwen = lv.registry.find_adapter(build("qwen2-vl", num_layers=3)[0])
    with pytest.raises(lv.ConfigError, match="VisionZip: its cost on .* is counted from the trace"):
        method.selection_flops(qwen.model_shape(qwen.model.config), [16], 0)


def test_budget_as_a_share():
    assert lv.VisionZip(keep_ratio=64 / 576).counts(576) == (54, 10)  # the reference's split
    assert lv.VisionZip(keep_ratio=128 / 576).counts(576) == (108, 20)
    assert lv.VisionZip(keep_ratio=1.0).counts(16) == (16, 0) and lv.VisionZip(keep_ratio=1.0).is_noop
    assert lv.VisionZip(keep_ratio=0.01).counts(16) == (1, 0)  # at least one token
    assert lv.VisionZip.at_budget(0.25, 32) == lv.VisionZip(keep_ratio=0.25)
    with pytest.raises(lv.ConfigError, match=r"VisionZip: keep_ratio=0 is outside \(0, 1\]"):
        lv.VisionZip(keep_ratio=0)
