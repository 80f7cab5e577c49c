"""Adapter-specific behaviour: M-RoPE positions, video tokens, AnyRes counts, unsupported options."""

import pytest
import torch
from models import PROMPTS, build, make_inputs, visual_counts

import leanvlm as lv
from leanvlm import compat
from leanvlm.registry import find_adapter

QWEN = ["qwen2-vl", "qwen2.5-vl"]


@pytest.mark.parametrize("adapter", QWEN)
@pytest.mark.parametrize(
    "method",
    [lv.FastV(layer=2, keep_ratio=0.5), lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25))],
    ids=["fastv", "pdrop"],
)
def test_mrope_kept_tokens_keep_their_original_3d_positions(adapter, method):
    """The rotary tables a layer gets after a drop equal those of the kept tokens' original (t, h, w) ids."""
    model, proc = build(adapter)
    inputs = make_inputs(proc, [PROMPTS[3], PROMPTS[0]])  # two images / one image, left-padded
    lm = model.model.language_model
    seen = {}

    def grab_positions(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"]

    last = max(step.layer for step in method.plan(lv.registry.find_adapter(model)))

    def grab_layer(module, args, kwargs):
        seen["cos"], seen["sin"] = kwargs["position_embeddings"]
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    with lv.apply(model, method) as applied:
        handles = [
            lm.register_forward_pre_hook(grab_positions, with_kwargs=True),
            lm.layers[last].register_forward_pre_hook(grab_layer, with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in handles:
                h.remove()
        stage = applied.trace.stages[-1]
    pos = seen["position_ids"]
    pos = pos[1:] if pos.shape[0] == 4 else pos  # [3, B, N] (t, h, w)
    assert pos.shape[0] == 3 and bool((pos[1] != pos[2]).any())  # real 2-D layout, not 1-D positions
    kept_ids = pos.gather(-1, stage.orig.expand(3, -1, -1))  # original ids of every kept slot
    cos, sin = lm.rotary_emb(seen["hidden"], kept_ids)
    valid = stage.valid
    assert stage.visual.sum() < (kept_ids.shape[-1] * 2)  # something was dropped
    torch.testing.assert_close(seen["cos"][valid], cos[valid])
    torch.testing.assert_close(seen["sin"][valid], sin[valid])


@pytest.mark.parametrize("adapter", QWEN)
def test_compact_positions_are_refused_on_mrope_and_auto_means_original(adapter):
    model, _ = build(adapter)
    with pytest.raises(
        lv.ConfigError, match=r"positions='compact' is not possible on Qwen2.*use positions='original'"
    ):
        lv.apply(model, lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25), positions="compact"))
    method = lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25))
    with lv.apply(model, method) as applied:
        assert method.resolved_positions(applied.adapter.supports_compact_positions) == "original"
    with lv.apply(build("llava")[0], method) as applied:
        assert method.resolved_positions(applied.adapter.supports_compact_positions) == "compact"


@pytest.mark.parametrize("adapter", QWEN)
def test_video_frames_count_as_visual_tokens(adapter):
    """A video placeholder run (built from an image's patches as a 2-frame clip) is ranked and dropped too."""
    model, proc = build(adapter)
    image_inputs = make_inputs(proc, [PROMPTS[0]])
    tok = proc.tokenizer
    image_id, video_id = (tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    ids = image_inputs["input_ids"].clone()
    is_visual = ids == image_id
    ids[is_visual] = video_id
    inputs = {
        "input_ids": ids,
        "attention_mask": image_inputs["attention_mask"],
        "pixel_values_videos": image_inputs["pixel_values"],
        "video_grid_thw": image_inputs["image_grid_thw"],
        "mm_token_type_ids": is_visual.to(torch.int32) * 2,
    }
    n = int(is_visual.sum())
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)) as applied:
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        visual = applied.trace.visual_per_layer[0]
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert visual == [n, n] + [n // 2] * 3
    assert torch.equal(cached, uncached)


def test_llava_next_anyres_counts_differ_per_sample_and_include_newlines():
    model, proc = build("llava-next")
    inputs = make_inputs(proc, PROMPTS)
    counts = visual_counts(model, inputs)
    assert len(set(counts)) == len(counts)  # every sample has its own visual count
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.25)) as applied, torch.no_grad():
        model(**inputs)
        visual = applied.trace.visual_per_layer
    assert [v[2] for v in visual] == [int(n * 0.25) for n in counts]
    # the newline embedding fills placeholder positions too: it is among the droppable visual tokens
    feats = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
    )
    newline = model.model.image_newline
    assert any(bool((f == newline).all(-1).any()) for f in feats.pooler_output)


@pytest.mark.parametrize("adapter", ["llava-next", "qwen2-vl", "qwen2.5-vl"])
def test_vision_flops_follow_the_real_image_sizes(adapter):
    model, proc = build(adapter)
    small = make_inputs(proc, [PROMPTS[2][0:1] + (1,)], image_size=56)
    large = make_inputs(proc, [PROMPTS[2][0:1] + (1,)], image_size=112)
    a = find_adapter(model)
    seq_small, seq_large = a.vision_sequences(small), a.vision_sequences(large)
    assert sum(seq_large) > sum(seq_small) > 0
    shape = type(a).model_shape(model.config)
    from leanvlm import flops

    def total(seqs):
        return sum(flops.vision_flops(shape.vision, n) for n in seqs)

    assert total(seq_large) > total(seq_small)


@pytest.mark.parametrize("adapter", ["llava-next", "qwen2-vl"])
def test_viz_draws_every_image_of_other_models(adapter):
    """Every image gets its pictures (LLaVA-NeXT: the base view and the high-resolution tiles; Qwen: its
    merged patch grid), each covering its visual tokens exactly once."""
    model, proc = build(adapter)
    inputs = make_inputs(proc, [PROMPTS[1]])
    a = find_adapter(model)
    pictures = a.image_grids(inputs)
    views = a.model_view(inputs, proc)
    assert len(pictures) == len(views) >= 1
    n_visual = int(a.visual_mask(inputs["input_ids"], None).sum())
    assert sum(len(cells) for _, cells in pictures) == n_visual  # every visual token, once
    for panels, cells in pictures:
        on_grid = cells[cells[:, 2] >= 0]
        assert len({tuple(c) for c in on_grid.tolist()}) == len(on_grid)  # no cell drawn twice
        for k, panel in enumerate(panels):
            here = on_grid[on_grid[:, 0] == k]
            assert bool((here[:, 1] < panel.rows).all()) and bool((here[:, 2] < panel.cols).all())


@pytest.mark.parametrize("adapter", ["llava-next", "qwen2-vl"])
def test_last_report_counts_the_vision_tower_of_variable_size_models(adapter):
    model, proc = build(adapter)
    inputs = make_inputs(proc, PROMPTS[:1])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)):
        with torch.no_grad():
            model(**inputs)
        report = lv.last_report(model)
    assert report.vision > 0 and report.images > 0
    assert report.notes == []
    batch = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)):
        with torch.no_grad():
            model(**batch)
        report = lv.last_report(model, sample=1)
    assert report.vision == 0 and "vision tower not counted" in report.notes[0]


def test_qwen_video_frames_are_separate_tower_sequences():
    model, _ = build("qwen2-vl")
    inputs = {
        "input_ids": torch.zeros(1, 3, dtype=torch.long),
        "video_grid_thw": torch.tensor([[4, 8, 6]]),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    assert find_adapter(model).vision_sequences(inputs) == [16] + [48] * 4


def test_llava_next_adjacent_images_count_every_crop():
    model, proc = build("llava-next")
    from leanvlm.presets import demo_image

    images = [demo_image(56, seed=1), demo_image(112, seed=2)]
    inputs = proc(text=["<image><image>\nCompare"], images=images, return_tensors="pt")
    ran = []
    handle = model.model.vision_tower.register_forward_hook(lambda m, a, o: ran.append(a[0].shape[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    assert len(find_adapter(model).vision_sequences(inputs)) == sum(ran)


def test_continuing_a_cache_with_another_method_is_refused():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)), torch.no_grad():
        cache = compat.output_cache(model(**inputs, use_cache=True))
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], -1)
    for other in (lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25)), None):
        with (
            lv.apply(model, *([other] if other else [])),
            pytest.raises(lv.LeanVLMError, match="continue a cache with the method that filled it"),
        ):
            model(input_ids=torch.full((2, 1), 7), attention_mask=mask, **{compat.cache_kwarg(model): cache})
