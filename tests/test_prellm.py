"""Before the LLM: composing a pre-LLM selection with an in-LLM method (the in-LLM one sees the reduced
span; the trace and FLOPs count both), pairs that can not compose, and the selection's cost in
``leanvlm flops``."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from models import build, make_inputs
from plugin_methods import DampenVision

import leanvlm as lv
from leanvlm import compat
from leanvlm.cli.main import main


@pytest.mark.parametrize("first", [lv.CDPruner(keep_ratio=0.5), lv.DivPrune(keep_ratio=0.5)])
def test_pre_llm_method_composes_with_pyramiddrop(first):
    model, proc = build("llava", num_layers=4)
    inputs = make_inputs(proc, [("What is shown in this image?", 1)])
    n = int(lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None).sum())
    pdrop = lv.PyramidDrop(layers=(1, 2), keep_ratios=(0.5, 0.25))
    assert [type(m) for m in lv.api.compose((pdrop, first))] == [type(first), lv.PyramidDrop]
    with lv.apply(model, pdrop, first) as applied, torch.no_grad():  # given in any order: stage order
        model(**inputs)
        per_layer = applied.trace.visual_per_layer[0]
        kept = applied.trace.kept_visual
        report = lv.last_report(model)
    after = round(0.5 * n)
    # PyramidDrop's shares are of what entered the LLM (the selection's output), as the schedules say
    assert per_layer == [after, int(after * 0.5), int(after * 0.25), int(after * 0.25)]
    assert per_layer == pdrop.visual_schedule(4, [after])
    # stages: the input, the selection, PyramidDrop's two drops; each keeps a subset of the one before
    assert [len(stage[0]) for stage in kept] == [n, *per_layer[:1], per_layer[1], per_layer[2]]
    assert all(set(b[0].tolist()) <= set(a[0].tolist()) for a, b in itertools.pairwise(kept))
    summary = report.summary()
    assert summary["visual_tokens_in"] == n and summary["selection_flops"] > 0
    assert summary["scoring_flops"] > 0  # PyramidDrop's rankings
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0]
    after_image = visual.numel() - 1 - int(visual.nonzero()[-1, 0])  # CDPruner's instruction tokens
    text = 0 if isinstance(first, lv.DivPrune) else after_image
    shape = lv.registry.find_adapter(model).model_shape(model.config)
    assert summary["selection_flops"] == first.selection_flops(shape, [n], text)


@pytest.mark.parametrize(
    "pair, names",
    [
        ((lv.DivPrune(), lv.CDPruner()), "DivPrune, CDPruner"),
        ((lv.RandomDrop(), lv.DivPrune()), "RandomDrop, DivPrune"),
    ],
)
def test_two_pre_llm_methods_are_refused(pair, names):
    model, _ = build("llava", num_layers=3)
    with pytest.raises(lv.IncompatibleMethodsError, match=f"at most one .*got {names}"):
        lv.apply(model, *pair)
    assert lv.api.handle_of(model) is None


def test_flops_command_counts_the_selection(capsys):
    code = main(["flops", "--method", "divprune:keep_tokens=64", "--method", "cdpruner", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    div, cdp = doc["methods"]
    n, d, text = 576, 4096, doc["text_tokens"]
    assert div["selection_flops"] == 2 * n * n * d + 3 * n * d + 2 * 64 * n
    k = 64
    assert (
        cdp["selection_flops"]
        == 3 * n * d + 2 * n * n * d + 3 * text * d + 2 * n * text * d + 2 * n * n + 2 * k * k * n
    )
    for m in (div, cdp):
        assert m["visual_tokens_in"] == n and m["layers"][0]["visual"] == 64
        assert m["vision_flops"] == doc_vision(capsys)  # the tower and projector run in full


def doc_vision(capsys):
    main(["flops", "--method", "none", "--json"])
    return json.loads(capsys.readouterr().out)["methods"][0]["vision_flops"]


def test_selection_time_is_recorded_only_when_asked():
    """The engine times the work before the LLM (vision steps and input-stage edits) into
    trace.selection_ms only while time_selection is on; in generate() too, where transformers may run the
    tower before the first forward."""
    model, proc = build("llava", num_layers=3)
    inputs = make_inputs(proc, [("What is shown in this image?", 1)])
    with lv.apply(model, lv.VisionZip(dominant=3, contextual=2)) as applied:
        with torch.no_grad():
            model(**inputs)
        assert applied.trace.selection_ms == 0
        applied.engine.time_selection = True
        with torch.no_grad():
            model(**inputs)
        forward_ms = applied.trace.selection_ms
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        generate_ms = applied.trace.selection_ms
    assert forward_ms > 0 and generate_ms > 0
    with lv.apply(model, DampenVision(layer=0, factor=0.5)) as applied:  # a vision step alone
        applied.engine.time_selection = True
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert applied.trace.selection_ms > 0  # timed even when the tower runs before the first forward


OLD_BEAMS = compat._parse(compat.installed_version()) < (5, 24)


@pytest.mark.parametrize("adapter", ["llava", "llava-next", "qwen2-vl"])
@pytest.mark.parametrize("method", [lv.DivPrune(keep_ratio=0.5), lv.VisionZip(dominant=2, contextual=1)])
@pytest.mark.parametrize(
    "images",
    [
        1,
        pytest.param(
            2,
            marks=pytest.mark.skipif(
                OLD_BEAMS,
                reason="transformers 5.18 repeats each image, not each sample's images, for beams ([A, A, B, B]): "
                "its own model pairs copies with the wrong images",
            ),
        ),
    ],
)
def test_beams_keep_what_each_sample_keeps_alone(adapter, method, images):
    """generate() with beams repeats each sample after it ran the vision tower (transformers >= 5.23;
    before, the tower runs on the repeated batch): the copies of a sample keep the same tokens, as many
    as the sample keeps in a greedy run (which tokens may differ from that run by float noise when the
    tower ran on another batch size)."""
    model, proc = build(adapter, num_layers=3)
    inputs = make_inputs(proc, [("What color is the car in the pictures?", images), ("What is shown?", 1)])
    with lv.apply(model, method) as applied:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        alone = applied.trace.kept_visual[-1]
        beams = model.generate(
            **inputs, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=2
        )
        copies = applied.trace.kept_visual[-1]
    assert beams.shape[0] == 4 and len(copies) == 4
    for b in range(4):
        assert torch.equal(copies[b], copies[b - b % 2]) and len(copies[b]) == len(alone[b // 2])


@pytest.mark.parametrize("adapter", ["llava", "llava-next", "qwen2-vl"])
def test_trace_counts_the_tokens_each_image_brings_to_the_llm(adapter):
    model, proc = build(adapter, num_layers=3)
    inputs = make_inputs(proc, [("What color is the car in the two pictures?", 2), ("Read the sign.", 0)])
    with lv.apply(model, lv.DivPrune(keep_ratio=0.5)) as applied, torch.no_grad():
        model(**inputs)
        images, text_only = applied.trace.visual_per_image(0), applied.trace.visual_per_image(1)
        per_layer = applied.trace.visual_per_layer[0]
        made = lv.last_report(model).summary()["visual_tokens_in"]
    assert len(images) == 2 and text_only == []
    assert [kept for _, kept in images] == [round(0.5 * n) for n, _ in images]
    assert sum(n for n, _ in images) == made
    assert sum(kept for _, kept in images) == per_layer[0]
    with lv.apply(model, lv.FastV(layer=1, keep_ratio=0.5)) as applied, torch.no_grad():
        model(**inputs)
        assert all(n == kept for n, kept in applied.trace.visual_per_image(0))  # reduced inside the LLM
