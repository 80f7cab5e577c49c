"""The engine hosts methods it does not know: inserted tokens and layer runners against oracles written
without the engine, composition by stage, and the refusals of what it cannot install."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from models import PROMPTS, build, make_inputs
from plugin_methods import CountingDecoder, DampenVision, EveryOtherFeature, FrozenVisual, InsertSummary
from test_invariants import METHODS, NOOPS

import leanvlm as lv
from leanvlm.engine import Insert, Keep, Merge, Step, Vision
from leanvlm.engine.edits import apply_edit
from leanvlm.engine.state import TokenState
from leanvlm.methods.base import Method


def _logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits[:, -1].float()


def test_every_registered_method_has_rows_in_the_matrix():
    for name, cls in lv.METHODS.items():
        assert any(type(m) is cls for m in METHODS.values()), f"{name} has no row in the invariant matrix"
        assert any(type(m) is cls for m in NOOPS.values()), f"{name} has no no-op row"


def test_inserted_tokens_equal_running_the_later_layers_on_the_longer_sequence():
    """Oracle: hidden states entering layer L from the unmodified model, the summary rows inserted by hand,
    layers L.. run directly with a causal mask and the anchor's position, then the model's norm and head."""
    model, proc = build("llava", "eager", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    method = InsertSummary(layer=2, count=2)
    with lv.apply(model, method) as applied:
        got = _logits(model, inputs)
        assert applied.trace.tokens_per_layer[0][2] == applied.trace.tokens_per_layer[0][1] + 2
    lm = model.model.language_model
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0]
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[2][0]  # input of layer 2
        first = int(visual.nonzero()[0, 0])
        mean = hidden[visual].mean(0)
        rows = torch.stack([mean * 0.5, mean * 1.0])
        h = torch.cat([hidden[:first], rows, hidden[first:]])[None]
        n = h.shape[1]
        pos = torch.arange(hidden.shape[0])
        pos = torch.cat([pos[:first], pos[first - 1 : first].repeat(2), pos[first:]])[None]
        rope = lm.rotary_emb(h, pos)
        causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        for layer in lm.layers[2:]:
            h = layer(h, attention_mask=causal, position_ids=pos, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        expected = model.lm_head(lm.norm(h))[:, -1].float()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, _logits(model, inputs), atol=1e-3)


def test_runner_equals_hooks_that_keep_visual_states():
    """Oracle: forward hooks on the stock layers put the visual tokens' input states back."""
    model, proc = build("llava", "sdpa", num_layers=5)
    inputs = make_inputs(proc, PROMPTS)
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)
    with lv.apply(model, FrozenVisual(start=2, end=4)):
        got = _logits(model, inputs)
    layers = model.model.language_model.layers

    def keep_visual(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        return torch.where(visual[..., None], h_in, output)

    handles = [layer.register_forward_hook(keep_visual, with_kwargs=True) for layer in layers[2:4]]
    try:
        expected = _logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, _logits(model, inputs), atol=1e-3)
    assert all("forward" not in vars(layer) for layer in layers)  # remove() gave the layers back


@pytest.mark.parametrize("adapter", ["llava", "qwen2-vl"])
def test_input_stage_then_in_llm_method_compose(adapter):
    model, proc = build(adapter, num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:2])
    fastv = lv.FastV(layer=2, keep_ratio=0.5)
    every = EveryOtherFeature(step=2)
    gen = dict(max_new_tokens=5, do_sample=False)
    with lv.apply(model, fastv, every) as applied:  # given in any order, run in stage order
        assert [type(m) for m in applied.engine.methods] == [EveryOtherFeature, lv.FastV]
        cached = model.generate(**inputs, **gen)
        uncached = model.generate(**inputs, **gen, use_cache=False)
        model(**inputs)
        visual = applied.trace.visual_per_layer
        stages = applied.trace.stages
    assert torch.equal(cached, uncached)
    n = int(stages[0].visual[1].sum())
    entered = -(-n // 2)
    assert visual[1] == [entered, entered] + [fastv.keep_count(entered)] * 3  # FastV's budget: what entered


def test_apply_refuses_what_the_engine_cannot_install():
    model, _ = build("llava")

    @dataclass(frozen=True)
    class InTheTower(Method):
        stage = "serving"
        is_noop = False

    @dataclass(frozen=True)
    class NeedsGradients(Method):
        needs = ("token_gradients",)
        is_noop = False

    with pytest.raises(
        lv.UnsupportedModelError,
        match="InTheTower acts at stage 'serving'.*installable stages: vision, input, llm, decode",
    ):
        lv.apply(model, InTheTower())
    with pytest.raises(
        lv.UnsupportedModelError,
        match="NeedsGradients needs 'token_gradients'.*provides: scores, image_ids, vision",
    ):
        lv.apply(model, NeedsGradients())
    with pytest.raises(
        lv.IncompatibleMethodsError,
        match="at most one input-stage method.*EveryOtherFeature, EveryOtherFeature",
    ):
        lv.apply(model, EveryOtherFeature(), EveryOtherFeature(step=3))
    with pytest.raises(
        lv.IncompatibleMethodsError,
        match=r"Composing\(start=2, end=4\) and Composing\(start=3, end=5\) both replace decoder layer 3",
    ):
        lv.apply(model, Composing(2, 4), Composing(3, 5))
    assert lv.remove(model) is False  # nothing was installed by a refused call
    with lv.apply(model, Composing(1, 2), Composing(3, 4)) as applied:  # methods that compose share a stage
        assert sorted(applied.engine.runners) == [1, 3]


@dataclass(frozen=True)
class Composing(FrozenVisual):
    composes = True


def test_plan_errors_name_the_method():
    model, _ = build("llava", num_layers=5)

    @dataclass(frozen=True)
    class BadLayer(Method):
        is_noop = False

        def plan(self, adapter):
            return [Step(7, lambda ctx: None)]

    with pytest.raises(lv.ConfigError, match="BadLayer: a step at layer 7 is outside \\[0, 4\\]"):
        lv.apply(model, BadLayer())

    @dataclass(frozen=True)
    class Quiet(BadLayer):
        changes_length = False

        def plan(self, adapter):
            return [Step(2, lambda ctx: None)]

    with pytest.raises(lv.ConfigError, match="Quiet declares changes_length=False but its plan edits"):
        lv.apply(model, Quiet())

    @dataclass(frozen=True)
    class Trains(BadLayer):
        trainable = True

    with pytest.raises(
        lv.ConfigError, match=r"Trains has trainable parts .* call lv.prepare\(model, method\) first"
    ):
        lv.apply(model, Trains())
    assert lv.remove(model) is False


def test_edits_check_their_tensors():
    valid = torch.ones(1, 4, dtype=torch.bool)
    s = TokenState.initial(valid, torch.tensor([[False, True, True, False]]), torch.arange(4)[None])
    h = torch.randn(1, 4, 8)
    with pytest.raises(lv.LeanVLMError, match="Keep.keep: got a torch.int64 tensor"):
        apply_edit(Keep(torch.ones(1, 4, dtype=torch.long)), h, s, None)
    chain = torch.tensor([[0, 0, 1, 3]])  # slot 2 points at slot 1, which does not lead itself
    with pytest.raises(
        lv.LeanVLMError, match=r"sample 0, slot 2 points at 1; each slot must point at a slot in \[0, 3\]"
    ):
        apply_edit(Merge(chain), h, s, None)
    with pytest.raises(lv.LeanVLMError, match="after the last slot"):
        apply_edit(Insert(torch.randn(1, 1, 8), torch.tensor([[3]])), h, s, None)
    h2, s2, changed = apply_edit(Insert(torch.randn(1, 2, 8), torch.tensor([[0, 0]])), h, s, None)
    assert changed and h2.shape == (1, 6, 8)
    assert s2.kind.tolist() == [[0, 3, 3, 1, 1, 0]] and s2.orig.tolist() == [[0, 0, 0, 1, 2, 3]]
    assert s2.order.tolist()[0] == sorted(s2.order.tolist()[0])  # causal order follows the slots


def test_deep_copy_of_a_model_with_a_runner_is_applied_on_its_own():
    import copy

    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    method = FrozenVisual(start=2, end=4)
    with lv.apply(model, method):
        expected = _logits(model, inputs)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(_logits(twin, inputs), expected)
        assert lv.remove(twin) is True
        assert all("forward" not in vars(layer) for layer in twin.model.language_model.layers)
        assert "forward" in vars(model.model.language_model.layers[2])  # the original stays applied
        torch.testing.assert_close(_logits(model, inputs), expected)
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)


@pytest.mark.parametrize("adapter", ["llava", "qwen2-vl"])
def test_vision_step_equals_a_hook_on_the_stock_tower(adapter):
    model, proc = build(adapter, num_layers=5)
    inputs = make_inputs(proc, PROMPTS)
    tower_layer = lv.registry.find_adapter(model).vision_layers[0]
    with lv.apply(model, DampenVision(layer=0, factor=0.5)):
        got = _logits(model, inputs)

    def dampen(module, args, kwargs):
        if args:
            return (args[0] * 0.5, *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] * 0.5
        return args, kwargs

    handle = tower_layer.register_forward_pre_hook(dampen, with_kwargs=True)
    try:
        expected = _logits(model, inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, _logits(model, inputs), atol=1e-3)


def test_what_a_vision_step_stores_reaches_later_steps():
    model, proc = build("qwen2.5-vl", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:2])
    seen = []

    @dataclass(frozen=True)
    class Observe(Method):
        stage = "vision"
        needs = ("vision",)
        is_noop = False

        def plan(self, adapter):
            def count(v):
                v.store["patches"] = v.store.get("patches", 0) + v.hidden.shape[0]

            return [Vision(0, count), Step(0, lambda ctx: seen.append(dict(ctx.vision)))]

    with lv.apply(model, Observe()):
        _logits(model, inputs)
    expected = int(inputs["image_grid_thw"].prod(-1).sum())  # every image's patches, before merging
    assert seen == [{"patches": expected}]
    with pytest.raises(lv.ConfigError, match="a vision step at layer 99 is outside"):

        @dataclass(frozen=True)
        class Deep(Observe):
            def plan(self, adapter):
                return [Vision(99, lambda v: None)]

        lv.apply(model, Deep())


@pytest.mark.parametrize("adapter", ["llava", "qwen2-vl"])
def test_decoding_method_runs_inside_stock_generate_and_equals_greedy(adapter):
    """Invariant 7 for the decoding entry: a decoding-stage method composed with FastV gives FastV's own
    greedy tokens; the explicit custom_generate entry gives what plain generate() gives, cached or not."""
    model, proc = build(adapter, num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:2])
    gen = dict(max_new_tokens=5, do_sample=False)
    fastv = lv.FastV(layer=2, keep_ratio=0.5)
    with lv.apply(model, fastv):
        plain = model.generate(**inputs, **gen)
        entry = model.generate(**inputs, **gen, custom_generate=lv.generation.generate)
        uncached = model.generate(**inputs, **gen, custom_generate=lv.generation.generate, use_cache=False)
    assert torch.equal(plain, entry) and torch.equal(plain, uncached)
    calls = len(CountingDecoder.steps)
    with lv.apply(model, CountingDecoder(), fastv) as applied:
        decoded = model.generate(**inputs, **gen)
        assert (
            applied.trace.decode_steps == 4
            and applied.trace.visual_per_layer[1][2] < applied.trace.visual_per_layer[1][1]
        )
    assert torch.equal(decoded, plain)
    assert CountingDecoder.steps[calls:] == [5]
    assert torch.equal(
        model.generate(**inputs, **gen, custom_generate=lv.generation.generate),
        model.generate(**inputs, **gen),
    )


def test_input_stage_without_an_attention_mask_equals_with_one():
    """Kept tokens keep their positions, which then skip: without a mask transformers would read the jumps
    as packed sequences. The engine always hands the model a mask."""
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    bare = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with lv.apply(model, EveryOtherFeature(step=2)):
        torch.testing.assert_close(_logits(model, bare), _logits(model, inputs))


def test_inserting_twice_after_one_token_keeps_a_strict_order():
    valid = torch.ones(1, 3, dtype=torch.bool)
    s = TokenState.initial(valid, torch.tensor([[False, True, False]]), torch.arange(3)[None])
    h = torch.randn(1, 3, 4)
    h, s, _ = apply_edit(Insert(torch.randn(1, 2, 4), torch.tensor([[0, 0]])), h, s, None)
    h, s, _ = apply_edit(Insert(torch.randn(1, 1, 4), torch.tensor([[0]])), h, s, None)
    order = s.order[0].tolist()
    assert order == sorted(order) and len(set(order)) == len(order)
    assert s.kind[0].tolist() == [0, 3, 3, 3, 1, 0]


def test_keep_squeezes_padding_and_counts_only_input_tokens_for_compact_positions():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    visual = torch.tensor([[False, False, False, True, False], [False, True, True, True, False]])
    s = TokenState.initial(valid, visual & valid, torch.arange(5).expand(2, 5))
    h = torch.randn(2, 5, 4)
    h, s, _ = apply_edit(Insert(torch.randn(2, 1, 4), torch.tensor([[2], [0]])), h, s, None)
    drop = s.visual | (s.kind == 3)  # every visual token and the inserted ones
    h2, s2, changed = apply_edit(Keep(~drop, compact=True), h, s, None)
    assert changed and h2.shape[1] == 2  # the padding went too: the widest sample keeps 2 tokens
    assert s2.valid.sum(-1).tolist() == [2, 2]
    assert s2.shift.tolist() == [1, 3]  # dropped input tokens only, not the inserted ones
    assert s2.pos[1].tolist() == [0, 1]  # text after the dropped image moves down by what was dropped


def test_runners_run_in_decode_steps_so_cached_equals_uncached():
    from leanvlm.engine import Replace

    @dataclass(frozen=True)
    class DampenText(Method):
        changes_length = False
        is_noop = False

        def plan(self, adapter):
            def run(ctx, i, layer, hidden, call_layer):
                out = call_layer(hidden)
                if ctx.decoding:
                    return out * 0.5
                return torch.where(ctx.state.visual[..., None], out, out * 0.5)

            return [Replace(2, 4, run)]

    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS)  # a text-only prompt in the batch too
    gen = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with lv.apply(model, DampenText()):
        cached = model.generate(**inputs, **gen)
        uncached = model.generate(**inputs, **gen, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_deep_copies_use_their_own_modules():
    from plugin_trainable import LearnedTokens

    model, proc = build("llava", num_layers=5)
    model = copy.deepcopy(model)
    inputs = make_inputs(proc, PROMPTS[:1])
    method = LearnedTokens(layer=1, count=2)
    lv.prepare(model, method)
    with lv.apply(model, method):
        original = _logits(model, inputs)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.leanvlm_modules["LearnedTokens"].tokens.mul_(3.0)
        assert not torch.allclose(_logits(twin, inputs), original, atol=1e-4)  # the copy's own tokens
        torch.testing.assert_close(_logits(model, inputs), original)
        lv.remove(twin)
    with lv.apply(model, FrozenVisual(2, 4)):
        layer = model.model.language_model.layers[2]
        alone = copy.deepcopy(layer)  # one layer alone: bound to itself, stock outside the model's calls
        assert vars(alone)["forward"].args[1] is alone
