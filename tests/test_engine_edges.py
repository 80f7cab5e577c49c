"""Engine behaviour beyond the invariant matrix: caches, cropping, beams, inputs it cannot use."""

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm import compat

METHOD = lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25))


def step(model, token, mask, cache):
    with torch.no_grad():
        return model(
            input_ids=token, attention_mask=mask, **{compat.cache_kwarg(model): cache}, use_cache=True
        ).logits[:, -1]


def test_cropped_cache_continues_like_a_fresh_one():
    """Rejecting draft tokens crops every layer's cache at its end; decoding must go on correctly."""
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:2])
    mask = inputs["attention_mask"]
    a, b, c = (torch.full((2, 1), t) for t in (101, 102, 103))
    ones = torch.ones(2, 1, dtype=mask.dtype)
    with lv.apply(model, METHOD), torch.no_grad():
        cache = compat.output_cache(model(**inputs, use_cache=True))
        lengths = compat.layer_lengths(cache)
        step(model, a, torch.cat([mask, ones], -1), cache)
        step(model, b, torch.cat([mask, ones, ones], -1), cache)
        cache.crop(-1)  # drop b
        after_crop = step(model, c, torch.cat([mask, ones, ones], -1), cache)
        fresh = compat.output_cache(model(**inputs, use_cache=True))
        step(model, a, torch.cat([mask, ones], -1), fresh)
        reference = step(model, c, torch.cat([mask, ones, ones], -1), fresh)
        assert compat.layer_lengths(cache) == [n + 2 for n in lengths]
        cache.crop(-4)  # into the prompt
        with pytest.raises(lv.LeanVLMError, match="cropped to .* into the reduced"):
            step(model, c, torch.cat([mask[:, :-2], ones], -1), cache)
    torch.testing.assert_close(after_crop, reference, atol=1e-5, rtol=1e-4)


def test_beam_search_runs_and_keeps_schedule():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, METHOD) as applied:
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False, use_cache=False)
        assert applied.trace.batch_size == 6  # 2 prompts x 3 beams
        assert applied.trace.visual_per_layer == [[16, 8, 8, 4, 4]] * 6
    assert torch.equal(beams, uncached)


def test_static_cache_is_refused_with_a_clear_error():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    with (
        lv.apply(model, METHOD),
        pytest.raises(lv.UnsupportedModelError, match="needs a DynamicCache .* got StaticCache"),
    ):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_labels_give_the_loss_of_the_kept_sequence():
    """With labels, the loss is computed on the kept tokens' labels (text is never dropped)."""
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:2])
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100  # supervise the last four tokens (text)
    with lv.apply(model, METHOD) as applied:
        out = model(**inputs, labels=labels)
        stage = applied.trace.stages[-1]
    kept_labels = labels.gather(1, stage.orig).masked_fill(~stage.valid, -100)
    shift_logits, shift_labels = out.logits[:, :-1].flatten(0, 1), kept_labels[:, 1:].flatten()
    expected = torch.nn.functional.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    with lv.apply(model, lv.FastV(keep_ratio=1.0)):  # a no-op: the model's own loss, exactly
        assert torch.equal(model(**inputs, labels=labels).loss, model(**inputs, labels=labels).loss)


def test_a_supervised_token_right_after_dropped_visual_tokens_is_refused():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    visual = (inputs["input_ids"] == model.config.image_token_id)[0].nonzero()[:, 0]
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, visual[-1] + 1] = inputs["input_ids"][0, visual[-1] + 1]  # predecessor is the last visual token
    with (
        lv.apply(model, lv.FastV(layer=2, keep_tokens=0)),
        pytest.raises(lv.LeanVLMError, match="needed for the loss"),
    ):
        model(**inputs, labels=labels)


def test_inputs_embeds_without_placeholders_warns():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    with torch.no_grad():
        merged = model.model(**inputs).last_hidden_state  # any tensor of the right shape without placeholders
    with lv.apply(model, METHOD), pytest.warns(UserWarning, match="no visual-token placeholders"):
        model(inputs_embeds=torch.randn_like(merged), attention_mask=inputs["attention_mask"])


def test_inputs_embeds_with_placeholders_are_reduced():
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with lv.apply(model, METHOD) as applied:
        with torch.no_grad():
            by_embeds = model(
                inputs_embeds=embeds,
                pixel_values=inputs["pixel_values"],
                attention_mask=inputs["attention_mask"],
            ).logits[:, -1]
        visual = applied.trace.visual_per_layer[0]
        with torch.no_grad():
            by_ids = model(**inputs).logits[:, -1]
    assert visual == [16, 8, 8, 4, 4]
    torch.testing.assert_close(by_embeds, by_ids)


def test_trace_resets_per_prefill_and_counts_only_real_tokens():
    model, proc = build("llava", num_layers=5)
    batch = make_inputs(proc, PROMPTS[:2])
    with lv.apply(model, METHOD) as applied:
        model(**batch)
        first = applied.trace.tokens_per_layer
        model(**make_inputs(proc, PROMPTS[1:2]))
        assert applied.trace.batch_size == 1
        assert applied.trace.tokens_per_layer[0] == first[1]
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert [row[0] for row in first] == lengths


def test_prompt_ending_with_an_image_keeps_its_last_token():
    """Captioning prompts end with the image: the last token (what generation continues from) stays."""
    model, proc = build("llava", num_layers=5)
    from leanvlm.presets import demo_image

    inputs = proc(text=["<image>"], images=[demo_image(56)], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    for method in (METHOD, lv.FastV(layer=2, keep_tokens=2), lv.FastV(layer=2, keep_tokens=2, query="text")):
        with lv.apply(model, method) as applied:
            model(**inputs)
            stages = list(applied.trace.stages)
            visual = applied.trace.visual_per_layer[0]
            cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        assert all(int(stage.orig[0, -1]) == n - 1 for stage in stages)
        expected = method.visual_schedule(5, [16])
        assert visual == expected  # the protected token counts against the budget
        assert torch.equal(cached, uncached)


def test_generate_with_inputs_keyword_ranks_with_the_prompt():
    model, proc = build("llava", num_layers=5)
    batch = make_inputs(proc, PROMPTS[:2])
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    with lv.apply(model, METHOD):
        cached = model.generate(inputs=batch["input_ids"], **kwargs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(
            inputs=batch["input_ids"], **kwargs, max_new_tokens=4, do_sample=False, use_cache=False
        )
    assert torch.equal(cached, uncached)


def test_copied_cache_and_reapplied_method_continue_correctly():
    import copy

    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:2])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], -1)
    token = torch.full((2, 1), 101)
    with lv.apply(model, METHOD), torch.no_grad():
        cache = compat.output_cache(model(**inputs, use_cache=True))
        copied = copy.deepcopy(cache)
        reference = step(model, token, mask, cache)
        from_copy = step(model, token, mask, copied)
    torch.testing.assert_close(from_copy, reference)
    with torch.no_grad(), lv.apply(model, METHOD):
        cache = compat.output_cache(model(**inputs, use_cache=True))
    with lv.apply(model, METHOD):  # removed and applied again between prefill and decode
        after_reapply = step(model, token, mask, cache)
    torch.testing.assert_close(after_reapply, reference)


def test_reset_cache_forgets_the_reduction_and_foreign_uneven_cache_is_refused():
    model, proc = build("llava", num_layers=5)
    image_inputs = make_inputs(proc, PROMPTS[:1])
    text_inputs = make_inputs(proc, PROMPTS[2:3])
    with torch.no_grad():
        base = model(**text_inputs).logits[:, -1]
    with lv.apply(model, METHOD), torch.no_grad():
        cache = compat.output_cache(model(**image_inputs, use_cache=True))
        cache.reset()
        reused = model(**text_inputs, **{compat.cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
        torch.testing.assert_close(reused, base)
        cache = compat.output_cache(model(**image_inputs, use_cache=True))
        del cache._leanvlm_kv_record  # as if filled by something that kept no record
        n = image_inputs["input_ids"].shape[1]
        with pytest.raises(lv.LeanVLMError, match="layers of different lengths .* no record"):
            step(model, torch.full((1, 1), 101), torch.ones(1, n + 1, dtype=torch.long), cache)


def test_prompt_length_ranks_with_the_prompt_when_an_answer_is_appended():
    """Scoring candidate answers appended to a prompt must not let the answer choose the visual tokens."""
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    n = inputs["input_ids"].shape[1]
    answer = proc.tokenizer(" a cat on a chair", add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = dict(
        inputs,
        input_ids=torch.cat([inputs["input_ids"], answer], -1),
        attention_mask=torch.ones(1, n + answer.shape[1], dtype=torch.long),
    )
    with lv.apply(model, METHOD) as applied, torch.no_grad():
        model(**inputs)
        prompt_only = [k.clone() for stage in applied.trace.kept_visual for k in stage]
        with applied.prompt_length(n):
            model(**full)
        with_answer = [k.clone() for stage in applied.trace.kept_visual for k in stage]
        assert applied.engine.prompt_len is None  # restored after the block
    assert all(torch.equal(a, b) for a, b in zip(prompt_only, with_answer, strict=True))
