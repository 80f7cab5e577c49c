"""VisualContextCompression: pooled states, positions, counts, 2-D grids, errors."""

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm.registry import find_adapter


def capture_layer_input(model, layer_idx, inputs):
    seen = {}
    layer = model.model.language_model.layers[layer_idx]

    def hook(module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["cos"], seen["sin"] = (t.detach().clone() for t in kwargs["position_embeddings"])

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("adapter", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("merge_position", ["mean", "first"])
def test_pooled_token_is_the_group_mean_at_the_pooled_position(adapter, merge_position):
    model, proc = build(adapter)
    inputs = make_inputs(proc, PROMPTS[:1])
    method = lv.VisualContextCompression(layer=2, stride=4, merge_position=merge_position)
    full = capture_layer_input(model, 2, inputs)  # layers before G are untouched, so this is G's input
    with lv.apply(model, method) as applied:
        pooled = capture_layer_input(model, 2, inputs)
        stage = applied.trace.stages[1]
    visual = find_adapter(model).visual_mask(inputs["input_ids"], None)[0]
    vis_pos = visual.nonzero()[:, 0]
    groups = vis_pos.view(-1, 4)  # one image; its visual count is a multiple of 4 here
    expected_hidden = full["hidden"][0, groups].mean(1)
    slots = torch.isin(stage.orig[0], groups[:, 0]).nonzero()[:, 0]
    assert torch.equal(stage.orig[0, slots], groups[:, 0])  # each group sits at its first member's place
    torch.testing.assert_close(pooled["hidden"][0, slots], expected_hidden)
    # position ids: floor of the group's mean (or the first member's), per M-RoPE row where there are rows
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen["pos"] = kwargs.get("position_ids")

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    pos = seen["pos"]
    if pos is None:  # LLaVA: positions 0..N-1
        pos = torch.arange(inputs["input_ids"].shape[1])[None]
    elif pos.dim() == 3:
        pos = pos[-3:, 0]  # [3, N] (t, h, w)
    member_pos = pos[:, groups]  # [R, G, 4]
    target = member_pos.float().mean(-1).floor().long() if merge_position == "mean" else member_pos[..., 0]
    ids = target if target.shape[0] == 3 else target[0]
    cos, _ = lm.rotary_emb(pooled["hidden"][:, slots], ids[None] if ids.dim() == 1 else ids[:, None])
    torch.testing.assert_close(pooled["cos"][0, slots], cos[0])
    # text tokens keep their own positions
    text_slot = stage.orig.shape[1] - 1
    torch.testing.assert_close(pooled["cos"][0, text_slot], full["cos"][0, -1])


def test_llava15_shape_4stage_counts():
    model, proc = build("llava", num_layers=32, image_size=336)
    inputs = make_inputs(proc, PROMPTS[:1], image_size=336)
    with lv.apply(model, lv.VisualContextCompression(layer=2, stride=8)) as applied, torch.no_grad():
        model(**inputs)
        assert applied.trace.visual_per_layer[0] == [576, 576] + [72] * 30
    with lv.apply(model, lv.VisualContextCompression(layer=16, stride=2)) as applied, torch.no_grad():
        model(**inputs)
        assert applied.trace.visual_per_layer[0] == [576] * 16 + [288] * 16


def test_2d_pooling_groups_square_blocks():
    model, proc = build("llava")  # 4x4 grid per image
    inputs = make_inputs(proc, PROMPTS[:1])
    with (
        lv.apply(model, lv.VisualContextCompression(layer=1, stride=4, pool="2d")) as applied,
        torch.no_grad(),
    ):
        model(**inputs)
        kept = applied.trace.kept_visual[1][0]
    first = int(find_adapter(model).visual_mask(inputs["input_ids"], None)[0].nonzero()[0])
    assert kept.tolist() == [first + r * 4 + c for r in (0, 2) for c in (0, 2)]
    with (
        lv.apply(model, lv.VisualContextCompression(layer=1, stride=4, pool="1d")) as applied,
        torch.no_grad(),
    ):
        model(**inputs)
        assert applied.trace.kept_visual[1][0].tolist() == [first + 4 * k for k in range(4)]


def test_uneven_runs_get_a_shorter_last_group():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[3:4])  # two images of 16 tokens each
    with lv.apply(model, lv.VisualContextCompression(layer=1, stride=5)) as applied, torch.no_grad():
        model(**inputs)
        assert applied.trace.visual_per_layer[0][1] == 2 * 4  # ceil(16 / 5) per image, never across images


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: lv.VisualContextCompression(stride=0), r"stride=0 must be an int >= 1"),
        (
            lambda: lv.VisualContextCompression(layer=0),
            r"layer=0 must be an int >= 1 \(layer 0 is not supported\)",
        ),
        (
            lambda: lv.VisualContextCompression(stride=8, pool="2d"),
            r"stride=8 must be a square number with pool='2d'",
        ),
        (lambda: lv.VisualContextCompression(pool="3d"), r"pool='3d' is not one of '1d', '2d'"),
        (
            lambda: lv.VisualContextCompression(merge_position="last"),
            r"merge_position='last' is not one of 'mean', 'first'",
        ),
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(lv.ConfigError, match=match):
        make()


def test_2d_pooling_needs_a_fixed_grid():
    model, _ = build("llava-next")
    with pytest.raises(
        lv.ConfigError,
        match="pool='2d' needs every image on one fixed grid, which LlavaNextForConditionalGeneration",
    ):
        lv.apply(model, lv.VisualContextCompression(layer=1, stride=4, pool="2d"))
    with pytest.raises(lv.ConfigError, match=r"layer=9 is outside \[1, 4\]"):
        lv.apply(model, lv.VisualContextCompression(layer=9))
