"""Random and uniform selection: deterministic, exact counts, the documented positions, clear errors."""

from __future__ import annotations

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm.methods.baselines import lattice, split, spread


def kept_visual(model, inputs, method):
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
        return applied.trace.kept_visual[-1], applied.trace.visual_per_layer


def test_random_is_deterministic_for_a_seed_and_differs_across_seeds():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    a, per_layer = kept_visual(model, inputs, lv.RandomDrop(keep_ratio=0.5, seed=1))
    b, _ = kept_visual(model, inputs, lv.RandomDrop(keep_ratio=0.5, seed=1))
    c, _ = kept_visual(model, inputs, lv.RandomDrop(keep_ratio=0.5, seed=2))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert per_layer[0] == [8] * 5  # before the LLM: every layer sees the subset


def test_lattice_is_evenly_spaced_in_both_directions():
    assert lattice(24, 24, 144) == [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]
    assert lattice(24, 24, 64) == [r * 24 + c for r in range(1, 24, 3) for c in range(1, 24, 3)]
    assert lattice(4, 4, 16) == list(range(16)) and lattice(4, 4, 0) == []
    for rows, cols, k in [(3, 8, 6), (5, 7, 11), (24, 24, 57), (1, 9, 4), (9, 1, 4), (6, 6, 35)]:
        picks = lattice(rows, cols, k)
        assert len(picks) == k == len(set(picks)) and picks == sorted(picks)
        assert all(0 <= p < rows * cols for p in picks)
    # no whole columns: a budget whose raster stride divides the width still spreads over columns
    assert len({p % 24 for p in lattice(24, 24, 144)}) == 12
    assert split(5, [16, 16]) == [3, 2] and split(7, [4, 12]) == [2, 5] and split(3, [0, 0]) == [0, 0]


def test_uniform_keeps_a_lattice_on_each_images_grid():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[3:4])  # two images of a 4 x 4 grid
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0].nonzero()[:, 0]
    images = [visual[:16], visual[16:]]
    for k in (2, 8, 9, 32):
        kept, per_layer = kept_visual(model, inputs, lv.UniformDrop(layer=2, keep_tokens=k))
        expected = torch.cat(
            [image[lattice(4, 4, part)] for image, part in zip(images, split(k, [16, 16]), strict=True)]
        )
        assert torch.equal(kept[0], expected)
        assert per_layer[0] == [32, 32] + [k] * 3


def test_uniform_on_a_qwen_grid_and_on_packed_tiles():
    model, proc = build("qwen2-vl", num_layers=3)
    inputs = make_inputs(proc, PROMPTS[:1])
    adapter = lv.registry.find_adapter(model)
    ((t, h, w),) = inputs["image_grid_thw"].tolist()
    grid = (h // 2, w // 2)
    assert adapter.token_grid(grid[0] * grid[1], {"image_grid_thw": inputs["image_grid_thw"]}) == grid
    visual = adapter.visual_mask(inputs["input_ids"], None)[0].nonzero()[:, 0]
    kept, _ = kept_visual(model, inputs, lv.UniformDrop(keep_tokens=4))
    assert torch.equal(kept[0], visual[lattice(*grid, 4)])
    next_model, next_proc = build("llava-next", num_layers=3)
    next_inputs = make_inputs(next_proc, PROMPTS[:1])
    next_visual = (
        lv.registry.find_adapter(next_model).visual_mask(next_inputs["input_ids"], None)[0].nonzero()[:, 0]
    )
    kept, _ = kept_visual(next_model, next_inputs, lv.UniformDrop(keep_tokens=10))
    assert torch.equal(kept[0], next_visual[spread(len(next_visual), 10)])  # packed tiles: raster order


def test_random_reduces_samples_without_an_answer_span_in_training():
    """Unlike the query-ranked methods, random selection needs no query row: it reduces every sample."""
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    labels = torch.full_like(inputs["input_ids"], -100)  # nothing supervised: no answer span
    with lv.apply(model, lv.RandomDrop(keep_ratio=0.5)) as applied, torch.no_grad():
        model(**inputs, labels=labels)
        assert applied.trace.visual_per_layer[0] == [8] * 5


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lv.RandomDrop(keep_ratio=0.0), r"RandomDrop: keep_ratio=0.0 is outside \(0, 1\]"),
        (lambda: lv.UniformDrop(keep_ratio=1.5), r"UniformDrop: keep_ratio=1.5 is outside \(0, 1\]"),
        (lambda: lv.RandomDrop(seed=-1), r"RandomDrop: seed=-1 must be an int in \[0, 2\*\*63\)"),
        (
            lambda: lv.UniformDrop(layer=-1),
            r"UniformDrop: layer=-1 must be an int >= 0 \(0: before the LLM\)",
        ),
        (lambda: lv.RandomDrop(keep_tokens=-2), r"RandomDrop: keep_tokens=-2 must be an int >= 0"),
        (
            lambda: lv.parse_method("random:positions=sideways"),
            r"RandomDrop: positions='sideways' is not one of",
        ),
    ],
)
def test_bad_settings_name_the_value_and_what_is_allowed(make, message):
    with pytest.raises(lv.ConfigError, match=message):
        make()


def test_layer_beyond_the_model_and_compact_on_mrope_are_refused():
    with pytest.raises(lv.ConfigError, match=r"UniformDrop: layer=9 is outside \[1, 4\]"):
        lv.apply(build("llava", num_layers=5)[0], lv.UniformDrop(layer=9))
    with pytest.raises(lv.ConfigError, match="positions='compact' is not possible on Qwen2"):
        lv.apply(build("qwen2-vl", num_layers=5)[0], lv.RandomDrop(positions="compact"))


def test_matched_budgets_and_flops_schedule():
    from leanvlm.flops import schedule_counts

    method = lv.RandomDrop.at_budget(0.25, 32)
    tokens, visual = schedule_counts(method, 32, 576, 13)
    assert visual == [144] * 32 and tokens == [157] * 32
    assert lv.UniformDrop.bench_default(32) == lv.UniformDrop()  # the class default, as on the command line
