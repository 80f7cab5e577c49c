"""The DESIGN.md invariants for every method on every adapter: 1-6 and 8 here (7, self-speculative
decoding, in test_engine_plans.py)."""

from __future__ import annotations

import pytest
import torch
from models import ADAPTERS, PROMPTS, build, build_for, make_inputs, visual_counts
from plugin_methods import CountingDecoder, DampenVision, EveryOtherFeature, FrozenVisual, InsertSummary
from plugin_trainable import LearnedTokens

import leanvlm as lv
from leanvlm import compat

NUM_LAYERS = 5
GEN = dict(max_new_tokens=6, do_sample=False)

METHODS = {
    "fastv": lv.FastV(layer=2, keep_ratio=0.5),
    "fastv-text-compact": lv.FastV(layer=1, keep_tokens=5, query="text", positions="compact"),
    "pdrop": lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125)),
    "pdrop-original-text": lv.PyramidDrop(
        layers=(2, 4), keep_ratios=(0.75, 0.25), positions="original", query="text"
    ),
    "vcc": lv.VisualContextCompression(layer=2, stride=4),
    "vcc-2d-first": lv.VisualContextCompression(layer=1, stride=4, pool="2d", merge_position="first"),
    "divprune": lv.DivPrune(keep_ratio=0.3),
    "divprune-tokens-original": lv.DivPrune(keep_tokens=3, positions="original"),
    "cdpruner": lv.CDPruner(keep_ratio=0.3),
    "cdpruner-prompt-theta-original": lv.CDPruner(
        keep_tokens=3, text="prompt", negate=True, theta=0.5, positions="original"
    ),
    "visionzip": lv.VisionZip(dominant=2, contextual=1),
    "visionzip-dominant-original": lv.VisionZip(dominant=3, contextual=0, positions="original"),
    "visionzip-ratio": lv.VisionZip(keep_ratio=0.4),
    "sparsevlm": lv.SparseVLM(keep_ratio=0.5, layers=(1, 2, 3)),
    "sparsevlm-plain-compact": lv.SparseVLM(
        keep_ratio=0.6, layers=(1, 3), recycle=False, positions="compact"
    ),
    "proxyv": lv.ProxyV(start_layer=2, reduce_factor=2),
    "crossget": lv.CrossGET(merge_per_layer=3),
    "crossget-original": lv.CrossGET(merge_per_layer=5, positions="original"),
    "proxyv-learned": lv.ProxyV(start_layer=3, reduce_factor=2, proxy="learned", learned_proxies=3),
    "random": lv.RandomDrop(keep_ratio=0.5, seed=3),
    "random-layer-compact": lv.RandomDrop(layer=2, keep_tokens=5, positions="compact"),
    "uniform": lv.UniformDrop(keep_ratio=0.25),
    "uniform-layer": lv.UniformDrop(layer=1, keep_ratio=0.5),
    # test-only methods (tests/plugin_methods.py), one of each kind the engine hosts
    "insert": InsertSummary(layer=2, count=2),
    "input": EveryOtherFeature(step=2),
    "input-compact": EveryOtherFeature(step=3, positions="compact"),
    "runner": FrozenVisual(start=2, end=4),
    "trainable": LearnedTokens(layer=1, count=2),
    "vision": DampenVision(layer=0, factor=0.5),
    "decode": CountingDecoder(),
}
NOOPS = {
    "fastv": lv.FastV(layer=2, keep_ratio=1.0),
    "pdrop": lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(1.0, 1.0, 1.0)),
    "vcc": lv.VisualContextCompression(layer=2, stride=1),
    "divprune": lv.DivPrune(keep_ratio=1.0),
    "cdpruner": lv.CDPruner(keep_ratio=1.0),
    "visionzip": lv.VisionZip(dominant=10_000, contextual=0),
    "visionzip-ratio": lv.VisionZip(keep_ratio=1.0),
    "sparsevlm": lv.SparseVLM(keep_ratio=1.0, layers=(1, 2, 3)),
    "proxyv": lv.ProxyV(start_layer=NUM_LAYERS, reduce_factor=2),
    "crossget": lv.CrossGET(merge_per_layer=0),
    "random": lv.RandomDrop(keep_ratio=1.0),
    "uniform": lv.UniformDrop(layer=2, keep_ratio=1.0),
    "insert": InsertSummary(count=0),
    "input": EveryOtherFeature(step=1),
    "runner": FrozenVisual(start=2, end=2),
    "trainable": LearnedTokens(count=0),
    "vision": DampenVision(factor=1.0),
    "decode": CountingDecoder(enabled=False),
}
DROPPING = (
    lv.CDPruner,
    lv.DivPrune,
    lv.FastV,
    lv.PyramidDrop,
    lv.RandomDrop,
    lv.UniformDrop,
    EveryOtherFeature,
)  # checked against the masking oracle (and VisionZip without contextual tokens: a pure drop)


def is_drop(method) -> bool:
    if isinstance(method, lv.VisionZip):
        return method.contextual == 0
    if isinstance(method, lv.SparseVLM):
        return not method.recycle
    return isinstance(method, DROPPING)


matrix = pytest.mark.parametrize("adapter", ADAPTERS)
methods = pytest.mark.parametrize("method", list(METHODS.values()), ids=list(METHODS))
MROPE = {"qwen2-vl", "qwen2.5-vl"}


@pytest.fixture(autouse=True)
def _skip_unsupported(request):
    """Compacted positions do not exist on M-RoPE models (tested to raise in test_adapters.py)."""
    params = getattr(request.node, "callspec", None)
    if params is None:
        return
    method, adapter = params.params.get("method"), params.params.get("adapter")
    if adapter in MROPE and getattr(method, "positions", None) == "compact":
        pytest.skip("positions='compact' is refused on M-RoPE models")
    if adapter != "llava" and isinstance(method, lv.CrossGET) and not method.is_noop:
        pytest.skip("CrossGET supports LLaVA-1.5 (tested to raise in test_crossget.py)")
    if adapter != "llava" and getattr(method, "pool", None) == "2d":
        pytest.skip("2-D pooling needs a fixed grid (tested to raise in test_llavolta.py)")


def image_runs(model, inputs) -> list[list[int]]:
    """Per sample, the length of each run of consecutive visual tokens (one run per image)."""
    mask = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None).tolist()
    out = []
    for row in mask:
        runs, n = [], 0
        for v in [*row, False]:
            if v:
                n += 1
            elif n:
                runs.append(n)
                n = 0
        out.append(runs)
    return out


def last_logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits[:, -1].float()


def hooks_on(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# 1. no-op setting == unmodified model ----------------------------------------------------------------
@matrix
@pytest.mark.parametrize("noop", list(NOOPS.values()), ids=list(NOOPS))
def test_noop_equals_baseline(adapter, noop):
    model, proc = build_for(noop, adapter, num_layers=NUM_LAYERS)
    inputs = make_inputs(proc, PROMPTS[:2])
    with torch.no_grad():
        base_logits = model(**inputs).logits
    base_tokens = model.generate(**inputs, **GEN)
    with lv.apply(model, noop) as applied:
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = model.generate(**inputs, **GEN)
        visual = applied.trace.visual_per_layer
    assert torch.equal(logits, base_logits)
    assert torch.equal(tokens, base_tokens)
    assert visual == [[n] * NUM_LAYERS for n in visual_counts(model, inputs)]


# 2. apply then remove leaves the model exactly as it was ---------------------------------------------
@matrix
@methods
def test_apply_remove_restores(adapter, method):
    model, proc = build_for(method, adapter, num_layers=NUM_LAYERS)
    inputs = make_inputs(proc, PROMPTS[:1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = last_logits(model, inputs)  # first: transformers installs hooks of its own on a first forward
    hooks = hooks_on(model)
    applied = lv.apply(model, method)
    assert hooks_on(model) > hooks
    if method.stage == "decode":  # it acts in generate(), through the decoding entry
        calls = len(CountingDecoder.steps)
        model.generate(**inputs, **GEN)
        assert CountingDecoder.steps[calls:] == [GEN["max_new_tokens"]]
    else:
        changed = last_logits(model, inputs)
        assert not torch.allclose(changed, base)  # the method did something
    applied.remove()
    assert hooks_on(model) == hooks
    assert "generate" not in vars(model)
    assert not lv.remove(model)  # nothing left to remove
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(last_logits(model, inputs), base)


# 3. generate with KV cache == recomputing from scratch ------------------------------------------------
@matrix
@methods
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_equals_no_cache(adapter, method, attn):
    model, proc = build_for(method, adapter, attn, num_layers=NUM_LAYERS)
    inputs = make_inputs(proc, PROMPTS[:2])
    gen = dict(GEN, return_dict_in_generate=True, output_logits=True)
    with lv.apply(model, method):
        cached = model.generate(**inputs, **gen, use_cache=True)
        uncached = model.generate(**inputs, **gen, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    # Every decode step's logits (reading the reduced cache) equal a full recomputation.
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, atol=2e-5, rtol=1e-4)


# 4. a left-padded batch == each prompt alone ----------------------------------------------------------
@matrix
@methods
def test_padded_batch_equals_single(adapter, method):
    model, proc = build_for(method, adapter, num_layers=NUM_LAYERS)
    batch = make_inputs(proc, PROMPTS)
    width = batch["input_ids"].shape[1]
    with lv.apply(model, method) as applied:
        batch_tokens = model.generate(**batch, **GEN)
        batch_logits = last_logits(model, batch)
        batch_visual = applied.trace.visual_per_layer
        batch_tokens_pl = applied.trace.tokens_per_layer
        batch_kept = applied.trace.kept_visual
        for b, item in enumerate(PROMPTS):
            single = make_inputs(proc, [item])
            pad = width - single["input_ids"].shape[1]
            tokens = model.generate(**single, **GEN)
            assert torch.equal(batch_tokens[b, width:], tokens[0, tokens.shape[1] - GEN["max_new_tokens"] :])
            torch.testing.assert_close(batch_logits[b], last_logits(model, single)[0], atol=2e-5, rtol=1e-4)
            assert applied.trace.visual_per_layer[0] == batch_visual[b]
            assert applied.trace.tokens_per_layer[0] == batch_tokens_pl[b]
            for stage_b, stage_1 in zip(
                batch_kept, applied.trace.kept_visual, strict=False
            ):  # text-only: one stage
                assert torch.equal(stage_b[b] - pad, stage_1[0])
    assert batch_visual[2] == [0] * NUM_LAYERS  # the text-only prompt passes through


# 5. eager == sdpa --------------------------------------------------------------------------------------
@matrix
@methods
def test_eager_equals_sdpa(adapter, method):
    results = []
    for attn in ("eager", "sdpa"):
        model, proc = build_for(method, adapter, attn, num_layers=NUM_LAYERS)
        inputs = make_inputs(proc, PROMPTS)
        with lv.apply(model, method) as applied:
            logits = last_logits(model, inputs)
            kept = applied.trace.kept_visual
        results.append((logits, kept))
    (le, ke), (ls, ks) = results
    for stage_e, stage_s in zip(ke, ks, strict=True):
        for a, b in zip(stage_e, stage_s, strict=True):
            assert torch.equal(a, b)
    torch.testing.assert_close(le, ls, atol=1e-4, rtol=1e-4)


# 6. drop-by-gather == drop-by-masking oracle -----------------------------------------------------------
def masking_oracle(model, inputs, trace, method):
    """Run the unmodified model, hiding from each layer the keys its stage dropped (instead of removing
    them), with compacted RoPE positions where the method uses them. Written independently of the engine."""
    layers = model.model.language_model.layers
    rotary = model.model.language_model.rotary_emb
    compact = (
        method.resolved_positions(lv.registry.find_adapter(model).supports_compact_positions) == "compact"
    )
    n = inputs["input_ids"].shape[1]
    b = inputs["input_ids"].shape[0]
    stages = trace.stages
    handles = []
    for s_idx in range(1, len(stages)):
        st = stages[s_idx]
        present = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):
            present[i, st.orig[i][st.valid[i]]] = True
        valid0 = inputs["attention_mask"].bool()
        dropped_before = (valid0 & ~present).long().cumsum(-1)
        start = st.layer
        end = stages[s_idx + 1].layer if s_idx + 1 < len(stages) else len(layers)

        def hook(module, args, kwargs, present=present, dropped_before=dropped_before):
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = mask.masked_fill(
                ~present[:, None, None, :], torch.finfo(mask.dtype).min
            )
            if compact:
                pos = kwargs["position_ids"].expand(b, n) - dropped_before
                kwargs["position_embeddings"] = rotary(args[0], pos)
            return args, kwargs

        for layer in layers[start:end]:
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return last_logits(model, inputs)
    finally:
        for h in handles:
            h.remove()


@matrix
@methods
def test_gather_equals_masking_oracle(adapter, method):
    if not is_drop(method):
        pytest.skip(
            "not a drop: merging is checked in test_llavolta.py, test_visionzip.py and test_sparsevlm.py, "
            "inserting / runners in test_engine_plans.py"
        )
    model, proc = build_for(method, adapter, "eager", num_layers=NUM_LAYERS)
    inputs = make_inputs(proc, PROMPTS)
    with lv.apply(model, method) as applied:
        gathered = last_logits(model, inputs)
        trace = applied.trace
    oracle = masking_oracle(model, inputs, trace, method)
    torch.testing.assert_close(gathered, oracle, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(gathered, last_logits(model, inputs), atol=1e-3)


# 8. the trace's counts == what the schedule says ------------------------------------------------------
@matrix
@methods
def test_trace_counts_follow_schedule(adapter, method):
    if adapter == "llava-next" and isinstance(method, lv.VisionZip):
        pytest.skip("VisionZip counts per tile on LLaVA-NeXT, not per image (counted in test_visionzip.py)")
    model, proc = build_for(method, adapter, num_layers=NUM_LAYERS)
    inputs = make_inputs(proc, PROMPTS)
    with lv.apply(model, method) as applied:
        last_logits(model, inputs)
        trace = applied.trace
    lengths = inputs["attention_mask"].sum(-1).tolist()
    runs = image_runs(model, inputs)
    shape = type(lv.registry.find_adapter(model)).model_shape(model.config)
    # a method that shortens the tower's sequence reads the tower's shape (its feature layer)
    tower = {"vision": shape.vision} if method.tower_schedule(shape.vision) is not None else {}
    if tower:
        assert trace.tower_tokens == dict(enumerate(method.tower_schedule(shape.vision)))
    for b, n_vis in enumerate(visual_counts(model, inputs)):
        expected = method.visual_schedule(NUM_LAYERS, runs[b], **tower)  # what the FLOPs formula assumes
        extra = method.extra_tokens(NUM_LAYERS, runs[b])
        assert n_vis == sum(runs[b])
        assert trace.visual_per_layer[b] == expected
        assert trace.tokens_per_layer[b] == [
            lengths[b] - n_vis + v + e for v, e in zip(expected, extra, strict=True)
        ]


@pytest.mark.parametrize(
    "method, expected",
    [
        (lv.PyramidDrop(), [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8),
        (lv.FastV(layer=2, keep_ratio=0.25), [576] * 2 + [144] * 30),
        (lv.FastV(layer=3, keep_tokens=64), [576] * 3 + [64] * 29),
    ],
    ids=["pdrop-default", "fastv-25", "fastv-64"],
)
def test_trace_counts_llava15_shape(method, expected):
    """LLaVA-1.5's 576 visual tokens on a 32-layer model, with the published schedules."""
    model, proc = build("llava", num_layers=32, image_size=336)
    inputs = make_inputs(proc, PROMPTS[:1], image_size=336)
    with lv.apply(model, method) as applied:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        visual = applied.trace.visual_per_layer[0]
        tokens = applied.trace.tokens_per_layer[0]
        cache_lengths = None
        out = model(**inputs, use_cache=True)
        cache_lengths = compat.layer_lengths(compat.output_cache(out))
    n_text = inputs["input_ids"].shape[1] - 576
    assert visual == expected
    assert tokens == [n_text + v for v in expected]
    assert cache_lengths == tokens  # every layer caches exactly what it processed


# The kept tokens are the top-scored ones, checked against the attention eager attention returns -----
@matrix
@pytest.mark.parametrize(
    "method",
    [lv.FastV(layer=2, keep_ratio=0.5), lv.PyramidDrop(layers=(3, 4), keep_ratios=(0.5, 0.25))],
    ids=["fastv", "pdrop"],
)
def test_kept_tokens_are_top_attended(adapter, method):
    model, proc = build_for(method, adapter, "eager", num_layers=NUM_LAYERS)
    inputs = make_inputs(proc, PROMPTS[:1])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    score_layer = method.scoring_layers(NUM_LAYERS)[0]
    visual_pos = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0].nonzero()[:, 0]
    n = len(visual_pos)
    n_keep = method.keep_count(n) if isinstance(method, lv.FastV) else method.keep_count(0, n)  # first stage
    received = attentions[score_layer][0, :, -1].mean(0)[visual_pos]  # last token's row, heads averaged
    top = visual_pos[received.topk(n_keep).indices].sort().values
    with lv.apply(model, method) as applied:
        last_logits(model, inputs)
        kept = applied.trace.kept_visual[1][0]
    assert torch.equal(kept, top)
