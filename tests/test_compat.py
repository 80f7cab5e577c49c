"""The transformers compat layer, loud failures, trace semantics after generate(), and the defects
found on transformers 5.24 (adjacent images, static caches, shift_labels, empty rows)."""

from __future__ import annotations

import pytest
import torch
from models import ADAPTERS, PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm import compat
from leanvlm.presets import chat_prompt, demo_image
from leanvlm.registry import find_adapter

GEN = dict(max_new_tokens=5, do_sample=False)


def cached_forward(model, inputs):
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return out, compat.output_cache(out)


# --- the compat layer itself ----------------------------------------------------------------------------
def test_installed_version_is_in_the_supported_range():
    assert compat.in_supported_range(), compat.version_note()
    assert not compat.in_supported_range("4.57.1")
    assert not compat.in_supported_range("99.0.0")


def test_cache_is_found_by_type_whatever_its_keyword():
    from transformers import DynamicCache

    cache = DynamicCache()
    assert compat.find_cache((), {"cache": cache}) is cache
    assert compat.find_cache((), {"past_key_values": cache}) is cache
    assert compat.find_cache((), {"renamed_in_a_future_release": cache}) is cache
    assert compat.find_cache((torch.zeros(1), cache), {}) is cache
    assert compat.find_cache((), {"past_key_values": None, "x": torch.zeros(2)}) is None


def test_output_cache_and_cache_kwarg_match_the_installed_release():
    model, proc = build("llava")
    out, cache = cached_forward(model, make_inputs(proc, PROMPTS[:1]))
    assert compat.is_cache(cache)
    assert compat.cache_kwarg(model) in ("cache", "past_key_values")
    assert compat.layer_lengths(cache) == [out.logits.shape[1]] * 5


def test_unknown_mask_encoding_raises_naming_the_version():
    with pytest.raises(lv.CompatError, match=r"transformers .* is installed; leanvlm supports"):
        compat.mask_kind({"full_attention": torch.ones(1)})


# --- a cache the engine cannot see raises instead of mis-computing -----------------------------------------
def test_decode_step_with_a_hidden_cache_raises(monkeypatch):
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25))):
        _, cache = cached_forward(model, inputs)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], -1)
        step = {"input_ids": torch.full((2, 1), 7), "attention_mask": mask, compat.cache_kwarg(model): cache}
        # what a release that hands the cache over in a form leanvlm does not recognise looks like
        monkeypatch.setattr(compat, "find_cache", lambda args, kwargs: None)
        with pytest.raises(lv.CompatError, match=r"cannot see a KV cache.*transformers \d"), torch.no_grad():
            model(**step)


def test_generate_with_a_hidden_cache_raises_at_the_prefill(monkeypatch):
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    monkeypatch.setattr(compat, "find_cache", lambda args, kwargs: None)
    with (
        lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)),
        pytest.raises(lv.CompatError, match="decoder layers were not seen to fill"),
        torch.no_grad(),
    ):
        model.generate(**inputs, **GEN)


def test_mask_that_disagrees_with_the_cache_raises():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)):
        _, cache = cached_forward(model, inputs)
        mask = torch.ones(1, inputs["input_ids"].shape[1] + 3, dtype=torch.long)
        with pytest.raises(lv.LeanVLMError, match="attention mask covers"), torch.no_grad():
            model(input_ids=torch.full((1, 1), 7), attention_mask=mask, **{compat.cache_kwarg(model): cache})


# --- trace semantics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_trace_after_generate_is_the_prefill_and_the_decode_steps_apart(adapter):
    model, proc = build(adapter)
    inputs = make_inputs(proc, PROMPTS[:2])
    method = lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25))
    with lv.apply(model, method) as applied:
        with torch.no_grad():
            model(**inputs)
        prefill = applied.trace.visual_per_layer
        with torch.no_grad():
            out = model.generate(**inputs, **GEN, return_dict_in_generate=True)
        trace = applied.trace
    n_visual = [int(v) for v in find_adapter(model).visual_mask(inputs["input_ids"], None).sum(-1)]
    assert trace.visual_per_layer == prefill
    assert [row[0] for row in trace.visual_per_layer] == n_visual
    assert [row[1] for row in trace.visual_per_layer] == [int(n * 0.5) for n in n_visual]
    new = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert trace.decode_steps == new - 1  # the prefill gives the first token
    assert all(r.cached and r.new_tokens.tolist() == [1, 1] for r in trace.decode)
    # the last step fed the (new-1)-th generated token: each layer attended to the real tokens it kept
    # in the prefill, plus the generated ones
    last = trace.decode[-1].kv_per_layer(model.config.text_config.num_hidden_layers)
    assert last == [[n + new - 1 for n in row] for row in trace.tokens_per_layer]
    assert last[0][4] < last[0][0]


def test_generate_without_cache_keeps_the_prefill_trace():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)) as applied:
        with torch.no_grad():
            model.generate(**inputs, **GEN, use_cache=False)
        trace = applied.trace
    n = inputs["input_ids"].shape[1]
    assert trace.tokens_per_layer[0][0] == n
    assert trace.decode_steps == GEN["max_new_tokens"] - 1
    assert all(not r.cached for r in trace.decode)
    assert trace.decode[-1].new_tokens.tolist() == [n + GEN["max_new_tokens"] - 1]


def test_trace_without_a_method_records_decode_steps():
    model, proc = build("qwen2-vl")
    inputs = make_inputs(proc, PROMPTS[:1])
    with lv.apply(model) as applied, torch.no_grad():
        model.generate(**inputs, **GEN)
    assert applied.trace.tokens_per_layer[0] == [inputs["input_ids"].shape[1]] * 5
    assert applied.trace.decode_steps == GEN["max_new_tokens"] - 1


# --- adjacent images are pooled apart ------------------------------------------------------------------------
def _two_adjacent_images(proc, side: int):
    text = chat_prompt(proc, "Compare", 0).replace("Compare", "<image><image>\nCompare")
    images = [demo_image(side, seed=1), demo_image(side, seed=2)]
    return proc(text=[text], images=images, return_tensors="pt")


def test_vcc_pools_two_adjacent_images_apart_1d_and_2d():
    model, proc = build("llava", image_size=84)  # 6x6 = 36 visual tokens per image
    inputs = _two_adjacent_images(proc, 84)
    assert int(find_adapter(model).visual_mask(inputs["input_ids"], None).sum()) == 72
    with lv.apply(model, lv.VisualContextCompression(layer=2, stride=5)) as applied, torch.no_grad():
        model(**inputs)
    assert applied.trace.visual_per_layer[0][2] == 8 + 8  # ceil(36 / 5) per image
    with (
        lv.apply(model, lv.VisualContextCompression(layer=2, stride=4, pool="2d")) as applied,
        torch.no_grad(),
    ):
        model(**inputs)
    assert applied.trace.visual_per_layer[0][2] == 9 + 9  # 3x3 blocks of 2x2 per image


def test_llava_next_image_token_counts_match_the_processor():
    model, proc = build("llava-next")
    adapter = find_adapter(model)
    for h, w in [(56, 56), (80, 100), (100, 60), (200, 90), (57, 169), (30, 30)]:
        image = demo_image(56, seed=3).resize((w, h))
        inputs = proc(text=["<image>\nx"], images=[image], return_tensors="pt")
        n = int(adapter.visual_mask(inputs["input_ids"], None).sum())
        assert adapter.image_token_counts(inputs) == [n], (h, w)


def test_adjacent_images_of_different_sizes_get_their_own_ids():
    """LLaVA-NeXT: `<image><image>` with a 56 px and a 112 px image: one run of placeholders, split by
    each image's own token count."""
    model, proc = build("llava-next")
    ad = find_adapter(model)
    images = [demo_image(56, seed=1), demo_image(112, seed=2)]
    singles = []
    for image in images:
        one = proc(text=["<image>\nx"], images=[image], return_tensors="pt")
        singles.append(int(ad.visual_mask(one["input_ids"], None).sum()))
    assert singles[0] != singles[1]
    both = proc(text=["<image><image>\nx"], images=images, return_tensors="pt")
    visual = ad.visual_mask(both["input_ids"], None)
    ids = ad.image_ids(visual, {**both, "has_input_ids": True})
    assert torch.bincount(ids[ids >= 0]).tolist() == singles
    assert ids[visual].tolist() == [0] * singles[0] + [1] * singles[1]  # in order, one run


def test_qwen_video_frames_are_images_of_their_own():
    model, proc = build("qwen2-vl")
    ad = find_adapter(model)
    ids = torch.tensor([[1, model.config.video_token_id, *[model.config.video_token_id] * 7, 2]])
    visual = ad.visual_mask(ids, None)
    grid = torch.tensor([[2, 4, 4]])  # two frames of 4x4 patches, 2x2 merge: 4 tokens per frame
    out = ad.image_ids(visual, {"input_ids": ids, "has_input_ids": True, "video_grid_thw": grid})
    assert out[0, 1:9].tolist() == [0] * 4 + [1] * 4


def test_vcc_never_merges_the_last_prompt_token():
    model, proc = build("llava")
    # a prompt whose last token is an image placeholder
    inputs = proc(text=["Look: <image>"], images=[demo_image(56, seed=4)], return_tensors="pt")
    ids = inputs["input_ids"]
    assert int(ids[0, -1]) == model.config.image_token_id
    with lv.apply(model, lv.VisualContextCompression(layer=2, stride=4)) as applied, torch.no_grad():
        model(**inputs)
    last = applied.trace.stages[-1]
    assert int(last.orig[0, -1]) == ids.shape[1] - 1  # the last slot is still the last prompt token
    assert applied.trace.visual_per_layer[0][2] == 5  # 15 others in groups of 4 -> 4, plus the last token


# --- static caches, shift_labels, empty rows, prompt_length -------------------------------------------------
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_static_cache_noop_is_transparent_and_reduction_refuses_it(adapter):
    model, proc = build(adapter)
    inputs = make_inputs(proc, PROMPTS[:2])
    with torch.no_grad():
        base = model.generate(**inputs, **GEN, cache_implementation="static")
        with lv.apply(model, lv.FastV(layer=2, keep_ratio=1.0)):
            same = model.generate(**inputs, **GEN, cache_implementation="static")
        assert torch.equal(base, same)
        with (
            lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)),
            pytest.raises(lv.UnsupportedModelError, match="needs a DynamicCache .* got StaticCache"),
        ):
            model.generate(**inputs, **GEN, cache_implementation="static")


def test_shift_labels_are_honoured_under_a_reducing_method():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    other = torch.full_like(ids, -100)
    other[:, -2:] = ids[:, -2:]
    shifted_other = torch.full_like(ids, -100)
    shifted_other[:, :-1] = other[:, 1:]
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)), torch.no_grad():
        plain = model(**inputs, labels=labels).loss
        from_other = model(**inputs, labels=other).loss
        honoured = model(**inputs, labels=labels, shift_labels=shifted_other).loss
    assert not torch.allclose(plain, from_other)
    torch.testing.assert_close(honoured, from_other)


@pytest.mark.parametrize(
    "method",
    [lv.FastV(layer=2, keep_ratio=0.5), lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25))],
    ids=["fastv", "pdrop"],
)
def test_a_row_of_padding_only_runs_like_the_stock_model(method):
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    inputs["attention_mask"][1] = 0
    with torch.no_grad(), lv.apply(model, method):
        out = model(**inputs).logits
        alone = model(**make_inputs(proc, PROMPTS[:1])).logits
        model.generate(**inputs, **GEN)
    assert torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0, -1], alone[0, -1], atol=1e-4, rtol=1e-4)


def test_prompt_length_is_checked():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:2])
    pads = (inputs["attention_mask"] == 0).sum(-1).tolist()
    row = 0 if pads[0] else 1
    pad = pads[row]
    assert pad > 0
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)) as applied:
        for bad in (0, -1, True, 2.5):
            with pytest.raises(lv.ConfigError, match=r"prompt_length: n=.* must be an int >= 1"):
                applied.prompt_length(bad).__enter__()
        with (
            applied.prompt_length(pad),
            pytest.raises(lv.ConfigError, match=rf"prompt_length\({pad}\): sample {row} has no token"),
            torch.no_grad(),
        ):
            model(**inputs)
        with applied.prompt_length(pad + 1), torch.no_grad():
            model(**inputs)


def test_generate_inside_prompt_length_keeps_it():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    n = inputs["input_ids"].shape[1]
    answer = {**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([[11, 12, 13]])], -1)}
    answer["attention_mask"] = torch.ones_like(answer["input_ids"])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)) as applied, torch.no_grad():
        with applied.prompt_length(n):
            model(**answer)
            before = applied.trace.kept_visual[1][0].tolist()
            model.generate(**inputs, **GEN)
            model(**answer)
            assert applied.trace.kept_visual[1][0].tolist() == before
        assert applied.engine.prompt_len is None
    import numpy as np

    with lv.apply(model) as applied, applied.prompt_length(np.int64(5)):
        assert applied.engine.prompt_len == 5


def test_trace_of_generate_in_a_worker_thread_is_visible():
    import threading

    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)) as applied, torch.no_grad():
        worker = threading.Thread(target=model.generate, kwargs={**inputs, **GEN})
        worker.start()
        worker.join()
        assert applied.trace.visual_per_layer[0][2] == 8
        assert applied.trace.decode_steps == GEN["max_new_tokens"] - 1
        assert lv.last_report(model).layers[0].visual == 16


def test_vcc_with_a_row_of_padding_only_on_llava_next():
    model, proc = build("llava-next")
    inputs = make_inputs(proc, PROMPTS[:2])
    inputs["attention_mask"][1] = 0
    with lv.apply(model, lv.VisualContextCompression(layer=2, stride=4)) as applied, torch.no_grad():
        out = model(**inputs).logits
    assert torch.isfinite(out[0]).all()
    assert applied.trace.visual_per_layer[1] == [0] * 5


def test_2d_pooling_is_refused_where_features_are_not_a_grid():
    from leanvlm.presets import build_preset

    model, _ = build_preset("tiny", seed=0)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(lv.ConfigError, match="pool='2d' needs every image on one fixed grid"):
        lv.apply(model, lv.VisualContextCompression(layer=1, stride=4, pool="2d"))


def test_batch_operations_on_a_reduced_cache_are_refused():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)), torch.no_grad():
        _, cache = cached_forward(model, inputs)
        cache.batch_repeat_interleave(2)
        mask = torch.ones(2, inputs["input_ids"].shape[1] + 1, dtype=torch.long)
        with pytest.raises(lv.LeanVLMError, match="batch operations on a reduced cache"):
            model(input_ids=torch.full((2, 1), 7), attention_mask=mask, **{compat.cache_kwarg(model): cache})


def test_deep_copy_of_one_hooked_layer_does_not_copy_the_model():
    import copy

    from leanvlm import api

    model, _ = build("llava")
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)):
        applied_before = len(api._APPLIED)
        layer = copy.deepcopy(model.model.language_model.layers[3])
        assert len(api._APPLIED) == applied_before
        assert layer is not model.model.language_model.layers[3]
