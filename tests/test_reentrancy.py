"""Per-call state stays with the call: threads sharing an applied model, draft tokens sent with the
prompt, deep copies of an applied model, models sharing submodules, caches changed unevenly."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm import compat
from leanvlm.engine import Engine

PDROP = lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25))


def leanvlm_hooks(model) -> int:
    """Hooks of leanvlm's engine on ``model`` (transformers adds output-capturing hooks of its own)."""

    def owner(fn):
        fn = getattr(fn, "func", fn)
        return getattr(fn, "__self__", None)

    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return sum(isinstance(owner(h), Engine) for h in hooks)


def fresh_llava():
    model, proc = build("llava")
    return copy.deepcopy(model), proc


def test_threads_sharing_an_applied_model_get_their_own_results():
    model, proc = build("llava")
    a, b = make_inputs(proc, PROMPTS[:1]), make_inputs(proc, PROMPTS[1:2])
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)) as applied, torch.no_grad():
        ref = [model(**a).logits, model(**b).logits]
        wrong, errors = [], []

        def worker(k: int) -> None:
            inputs = (a, b)[k]
            for _ in range(15):
                try:
                    out = model(**inputs).logits
                    if not torch.allclose(out, ref[k], atol=1e-5):
                        wrong.append(k)
                    if applied.trace.tokens_per_layer[0][0] != inputs["input_ids"].shape[1]:
                        wrong.append(("trace", k))
                except Exception as err:  # noqa: BLE001  (counted, then asserted empty)
                    errors.append(repr(err))

        threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and wrong == []


@pytest.mark.parametrize("method", [lv.FastV(layer=2, keep_ratio=0.5), PDROP], ids=["fastv", "pdrop"])
def test_draft_tokens_sent_with_the_prompt_can_be_rejected(method):
    """What assisted and prompt-lookup decoding do: the first forward carries the prompt and draft
    tokens; rejected drafts are cropped off the cache; decoding goes on from the accepted ones."""
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    n = ids.shape[1]
    drafts, nxt = torch.tensor([[11, 12, 13, 14]]), torch.tensor([[21]])
    kw = compat.cache_kwarg(model)
    with lv.apply(model, method) as applied, torch.no_grad():
        full = torch.cat([ids, drafts], -1)
        with applied.prompt_length(n):
            cache = compat.output_cache(
                model(
                    input_ids=full, attention_mask=torch.ones_like(full), pixel_values=pixels, use_cache=True
                )
            )
        cache.crop(-3)  # drafts 2..4 rejected
        step = model(input_ids=nxt, attention_mask=torch.ones(1, n + 2, dtype=torch.long), **{kw: cache})
        accepted = torch.cat([ids, drafts[:, :1], nxt], -1)
        with applied.prompt_length(n):
            ref = model(input_ids=accepted, attention_mask=torch.ones_like(accepted), pixel_values=pixels)
    torch.testing.assert_close(step.logits[:, -1], ref.logits[:, -1], atol=1e-5, rtol=1e-5)
    # cropping into the prompt itself is still refused
    with lv.apply(model, method) as applied, torch.no_grad():
        with applied.prompt_length(n):
            cache = compat.output_cache(
                model(
                    input_ids=full, attention_mask=torch.ones_like(full), pixel_values=pixels, use_cache=True
                )
            )
        cache.crop(-6)
        with pytest.raises(lv.LeanVLMError, match="cropped to .* into the reduced"):
            model(input_ids=nxt, attention_mask=torch.ones(1, n - 1, dtype=torch.long), **{kw: cache})


def test_a_cache_shortened_unevenly_is_refused():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    n = inputs["input_ids"].shape[1]
    kw = compat.cache_kwarg(model)
    with lv.apply(model, PDROP), torch.no_grad():
        cache = compat.output_cache(model(**inputs, use_cache=True))
        for t in (5, 6, 7):
            mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long)
            model(input_ids=torch.tensor([[t]]), attention_mask=mask, **{kw: cache})
        for layer in cache.layers:  # an absolute crop to n + 1 shortens only the longer layers
            if layer.get_seq_length() > n + 1:
                layer.keys, layer.values = layer.keys[..., : n + 1, :], layer.values[..., : n + 1, :]
        with pytest.raises(lv.LeanVLMError, match="changed unevenly"):
            model(
                input_ids=torch.tensor([[9]]),
                attention_mask=torch.ones(1, n + 2, dtype=torch.long),
                **{kw: cache},
            )


def test_deep_copy_of_an_applied_model_is_applied_on_its_own():
    model, proc = fresh_llava()
    inputs = make_inputs(proc, PROMPTS[:2])
    with torch.no_grad():
        base = model(**inputs).logits
        handle = lv.apply(model, PDROP)
        reduced = model(**inputs).logits
        twin = copy.deepcopy(model)
        twin_reduced = twin(**inputs).logits
        assert leanvlm_hooks(twin) == leanvlm_hooks(model) > 0
        torch.testing.assert_close(twin_reduced, reduced)
        assert (
            twin.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1]
            == inputs["input_ids"].shape[1] + 4
        )
        assert lv.remove(twin) is True
        torch.testing.assert_close(twin(**inputs).logits, base)
        torch.testing.assert_close(model(**inputs).logits, reduced)  # the original is still applied
        assert handle.active
        handle.remove()
        torch.testing.assert_close(model(**inputs).logits, base)
    assert leanvlm_hooks(twin) == 0 and leanvlm_hooks(model) == 0
    assert "generate" not in vars(twin)


def test_two_models_sharing_submodules_can_not_both_be_applied():
    model, proc = fresh_llava()
    other = copy.copy(model)  # a second model object over the same submodules
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)):
        with pytest.raises(lv.IncompatibleMethodsError, match="shares its .* with another model"):
            lv.apply(other, lv.FastV(layer=2, keep_ratio=0.5))
        assert lv.remove(other) is False
    with lv.apply(other, lv.FastV(layer=2, keep_ratio=0.5)):  # fine once the first is removed
        pass
