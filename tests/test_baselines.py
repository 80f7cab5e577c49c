"""Random and uniform selection: deterministic, exact counts, the documented positions, clear errors."""

from __future__ import annotations

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv


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


def test_uniform_keeps_evenly_spaced_tokens():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0].nonzero()[:, 0]
    n = len(visual)
    for k in (1, 4, 5, n):
        kept, per_layer = kept_visual(model, inputs, lv.UniformDrop(layer=2, keep_tokens=k))
        expected = visual[[int((i + 0.5) * n / k) for i in range(k)]]
        assert torch.equal(kept[0], expected)
        assert per_layer[0] == [n, n] + [k] * 3


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
    assert lv.UniformDrop.bench_default(32) == lv.UniformDrop(keep_ratio=0.25)
