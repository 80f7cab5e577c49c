"""The engine: drives token reduction through a stock transformers decoder-layer loop.

It never copies a model's forward. Hooks on four places do the work:

* the VLM module (pre-hook): sees ``input_ids`` and records which positions are visual tokens;
* the LLM decoder stack (pre / post hooks): decides whether this call is a fresh prefill (no cached
  tokens: tokens may be dropped) or an extension of a cache that an earlier prefill reduced (the new
  tokens attend only to what each layer kept), and records the trace;
* decoder layers (pre-hooks): at a scoring layer, rank visual tokens; at a reduction layer, gather
  the hidden states, positions, rotary tables and mask; at every later layer, hand it the reduced
  mask / positions instead of the full-length ones the model built for layer 0.

Layers before the first reduction always see the full sequence, so layer 0's cache length (which
transformers reads for positions and masks) stays in original coordinates.

Everything the hooks read of transformers' calling conventions (where the KV cache is, the rotary
tables, the mask encodings) goes through :mod:`leanvlm.compat`; a call the engine cannot read raises.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import warnings
from dataclasses import dataclass, field

import torch

from .. import compat
from ..errors import ConfigError, LeanVLMError, UnsupportedModelError
from ..ops import (
    attention_to_keys,
    build_bool_mask,
    compact_indices,
    gather_mask,
    mean_query_scores,
    to_layer_format,
    topk_keep,
)
from ..ops.masks import mask_keys
from .cache import check_cache, get_kv_record, set_kv_record
from .state import KVMap, TokenState, expand_positions, gather_positions, gather_rows
from .trace import DecodeRecord, ScoreRecord, StageRecord, Trace

IGNORE_INDEX = -100
VISION_KEYS = ("image_sizes", "image_grid_thw", "video_grid_thw")


@dataclass
class _Call:
    """Per-forward bookkeeping."""

    mode: str  # "prefill" or "extend"
    n_input: int
    valid: torch.Tensor  # [B, N] of the call's own tokens
    position_ids: torch.Tensor | None = None  # what the decoder stack was given (M-RoPE: [3, B, N])
    query_rows: torch.Tensor | None = None  # [B, N] training queries: the token before each answer span
    visual: torch.Tensor | None = None
    image_ids: torch.Tensor | None = None  # [B, N] which image each visual token belongs to (-1: none)
    prompt_len: int = 0
    visual_counts: list[int] = field(default_factory=list)
    state: TokenState | None = None
    reduced: bool = False
    stage_states: list[TokenState] = field(default_factory=list)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    rope: dict = field(default_factory=dict)
    cache: object | None = None
    #: where this call's stage records go: the trace's prefill, or a decode record when generate()
    #: runs without a KV cache and recomputes the whole sequence at every step after the first
    records: list[StageRecord] = field(default_factory=list)
    recompute: bool = False
    # extend mode
    kvmaps: list[KVMap] = field(default_factory=list)
    past_len: int = 0
    n_prompt: int = 0
    new_orig: torch.Tensor | None = None


def _remove_hook(module: torch.nn.Module, kind: str, hook_id: int) -> None:
    """Remove hook ``hook_id`` from ``module`` (what torch's RemovableHandle does; kept by id so that a
    deep copy of the model, whose hooks carry the same ids, can remove its own)."""
    names = (
        ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
        if kind == "pre"
        else ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    )
    for name in names:
        getattr(module, name, {}).pop(hook_id, None)


def align_labels(labels: torch.Tensor, orig: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Labels of the tokens the last layer kept ([B, n]), so that a causal-LM loss on the shorter logits
    is the loss of the full sequence: every supervised token and the token before it must be kept
    (text is never dropped, so this holds whenever answers follow text, as in chat templates)."""
    kept = labels.gather(1, orig).masked_fill(~valid, IGNORE_INDEX)
    present = torch.zeros_like(labels, dtype=torch.bool)
    present.scatter_(1, orig, valid)
    supervised = labels != IGNORE_INDEX
    needed = supervised.clone()
    needed[:, :-1] |= supervised[:, 1:]  # ... and each one's predecessor
    _check_present(needed, present)
    return kept


def align_shift_labels(shift_labels: torch.Tensor, orig: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``shift_labels`` (the target of each position: the next token) of the tokens the last layer kept.
    A kept token predicts its original next token; every position with a target must be kept."""
    kept = shift_labels.gather(1, orig).masked_fill(~valid, IGNORE_INDEX)
    present = torch.zeros_like(shift_labels, dtype=torch.bool)
    present.scatter_(1, orig, valid)
    _check_present(shift_labels != IGNORE_INDEX, present)
    return kept


def _check_present(needed: torch.Tensor, present: torch.Tensor) -> None:
    if bool((needed & ~present).any()):
        b, p = (needed & ~present).nonzero()[0].tolist()
        raise LeanVLMError(
            f"sample {b}: position {p} is needed for the loss (a supervised token or the one before it) "
            "but the method removed it; supervised tokens must follow text tokens"
        )


class _PerThread:
    """An engine attribute that each thread sees on its own: the state of the forward call a thread is
    running (and its trace), so that threads sharing one applied model never see each other's calls."""

    def __init__(self, default=None, factory=None):
        self.default, self.factory = default, factory

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, engine, owner=None):
        if engine is None:
            return self
        local = engine._local
        if not hasattr(local, self.name):
            setattr(local, self.name, self.factory(engine) if self.factory else self.default)
        return getattr(local, self.name)

    def __set__(self, engine, value):
        setattr(engine._local, self.name, value)


class Engine:
    """Installs the hooks for one in-LLM method (or none: then it only records the trace).

    Everything about a forward in flight (and the trace of the last one) is per thread."""

    trace = _PerThread(factory=lambda engine: Trace(num_layers=engine.adapter.num_layers))
    prompt_len = _PerThread()
    _visual = _PerThread()
    _labels = _PerThread()
    _shift_labels = _PerThread()
    _vision_inputs = _PerThread()
    _final = _PerThread()
    _call = _PerThread()
    #: inside generate(): how many fresh (uncached) forwards of the decoder stack it has run
    _generate_fresh = _PerThread()

    def __init__(self, adapter, method=None):
        self._local = threading.local()
        self.adapter = adapter
        self.method = method
        n_layers = adapter.num_layers
        self.stages = [] if method is None or method.is_noop else method.drop_stages(n_layers)
        self.positions = (
            method.resolved_positions(adapter.supports_compact_positions)
            if method is not None
            else "original"
        )
        self.query = getattr(method, "query", "last")
        self.stage_of_layer = [sum(s.layer <= i for s in self.stages) for i in range(n_layers)]
        self.score_at: dict[int, list[int]] = {}
        for i, s in enumerate(self.stages):
            if s.kind == "drop":
                self.score_at.setdefault(s.score_layer, []).append(i)
        self.reduce_at = {s.layer: i for i, s in enumerate(self.stages)}
        self.layout = tuple(s.layer for s in self.stages)  # which layers' caches differ (stored with a cache)
        #: (module, "pre" | "post", hook id) of every hook installed; every hook is a bound method of the
        #: engine (or a partial of one), so that a deep copy of the model gets a copy of the engine
        self._hooked: list[tuple[torch.nn.Module, str, int]] = []
        self._patched_generate = False
        #: the trace of the last prefill in any thread (what a thread that ran none sees)
        self.last_trace: Trace | None = None
        #: called with the engine of a deep copy of the model (the API registers the copy's handle)
        self.on_copy = None

    # --- install / remove ---------------------------------------------------------------------------
    def install(self) -> None:
        a = self.adapter
        if self.stages:
            first = min([*self.score_at, self.stages[0].layer])
            for i in range(first, a.num_layers):
                compat.check_decoder_layer(a.layers[i])
        self._hook(a.vlm_model, "pre", self._vlm_pre)
        self._hook(a.model, "pre", self._top_pre)
        self._hook(a.model, "post", self._top_post)
        self._hook(a.text_model, "pre", self._text_pre)
        self._hook(a.text_model, "post", self._text_post)
        if self.stages:
            for i in range(first, a.num_layers):
                self._hook(a.layers[i], "pre", functools.partial(self._layer_hook, i))
        # generate() without a KV cache re-runs the whole sequence each step; ranking must keep using
        # the last *prompt* token so that cached and uncached generation keep the same tokens, and the
        # trace keeps the prefill (the first forward) while later forwards are decode steps.
        a.model.generate = functools.partial(self._generate, a.model)
        self._patched_generate = True

    def _hook(self, module, kind: str, fn) -> None:
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        self._hooked.append((module, kind, register(fn, with_kwargs=True).id))

    def hooked_modules(self) -> list[torch.nn.Module]:
        return [m for m, _, _ in self._hooked]

    def remove(self) -> None:
        for module, kind, hook_id in self._hooked:
            _remove_hook(module, kind, hook_id)
        self._hooked.clear()
        if self._patched_generate:
            del self.adapter.model.generate
            self._patched_generate = False
        self._call = None
        self._visual = None

    def __deepcopy__(self, memo):
        """A deep copy of an applied model gets its own engine, driving the copy's hooks. A deep copy of
        one hooked submodule alone keeps pointing at this engine (its hooks then do nothing outside this
        model's calls) instead of dragging a copy of the whole model along."""
        if id(self.adapter.model) not in memo:
            return self
        new = copy.copy(self)
        memo[id(self)] = new
        new._local = threading.local()
        new.last_trace = None
        new.adapter = copy.deepcopy(self.adapter, memo)
        new._hooked = [(copy.deepcopy(m, memo), kind, hook_id) for m, kind, hook_id in self._hooked]
        if self.on_copy is not None:
            self.on_copy(new)
        return new

    def _generate(self, model, *args, **kwargs):
        inputs = kwargs.get("inputs", kwargs.get("input_ids", args[0] if args else None))
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        saved = self.prompt_len, self._generate_fresh  # generate() may run inside prompt_length() or itself
        self.prompt_len = inputs.shape[1] if inputs is not None else None
        self._generate_fresh = 0
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            self.prompt_len, self._generate_fresh = saved

    # --- hooks on the VLM and the decoder stack ----------------------------------------------------------
    def _vlm_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            self._visual = None
            return
        self._visual = self.adapter.visual_mask(input_ids, embeds)
        self._vision_inputs = {k: kwargs[k] for k in VISION_KEYS if kwargs.get(k) is not None}
        self._vision_inputs["input_ids"] = input_ids if input_ids is not None else embeds[..., 0]
        self._vision_inputs["has_input_ids"] = input_ids is not None
        past = compat.find_cache(args, kwargs)
        fresh = (
            embeds is not None and embeds.shape[1] > 1 and (past is None or compat.cache_length(past) == 0)
        )
        if input_ids is None and self.stages and fresh and not bool(self._visual.any()):
            warnings.warn(
                "leanvlm found no visual-token placeholders in inputs_embeds, so nothing is dropped; "
                "pass input_ids (with pixel_values) to let the method locate the visual tokens",
                stacklevel=2,
            )

    def _top_pre(self, module, args, kwargs):
        # The model's logits will cover only the kept tokens: take the labels, and compute the loss
        # against the labels of those tokens once the forward is done (_top_post).
        if not self.stages or kwargs.get("labels") is None:
            self._labels = self._shift_labels = None
            return None
        self._labels = kwargs.pop("labels")
        self._shift_labels = kwargs.pop("shift_labels", None)
        return args, kwargs

    def _top_post(self, module, args, kwargs, output):
        labels, self._labels = self._labels, None
        shift_labels, self._shift_labels = self._shift_labels, None
        if labels is None:
            return None
        if not hasattr(output, "logits"):
            raise UnsupportedModelError("labels with a token-reducing method need return_dict=True outputs")
        if self._final is not None:
            labels = align_labels(labels, *self._final)
            if shift_labels is not None:
                shift_labels = align_shift_labels(shift_labels, *self._final)
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if kwargs.get(k) is not None}
        output.loss = compat.causal_lm_loss(
            module, output.logits, labels=labels, shift_labels=shift_labels, **loss_kwargs
        )
        return output

    def _text_pre(self, module, args, kwargs):
        self._call = None
        self._final = None
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ref, torch.Tensor):
            raise compat.fail(f"{type(module).__name__} was called without input_ids or inputs_embeds")
        b, n = ref.shape[:2]
        device = ref.device
        past = compat.find_cache(args, kwargs)
        past_len = compat.cache_length(past) if past is not None else 0
        mask2d = kwargs.get("attention_mask")
        mask_past = 0  # tokens the 2-D mask covers before this input: an earlier prefill's, if any
        if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2:
            valid = mask2d[:, -n:].bool()
            mask_past = mask2d.shape[1] - n
        else:
            valid = torch.ones(b, n, dtype=torch.bool, device=device)
        visual = self._visual
        self._visual = None
        if visual is None or visual.shape != (b, n):
            visual = torch.zeros(b, n, dtype=torch.bool, device=device)
        # every image's placeholders, padded rows' included (the images' token counts cover them)
        placeholders = visual.to(device)
        visual = placeholders & valid

        if self.stages:
            if past is None and mask_past > 0:
                raise compat.fail(
                    f"this forward continues {mask_past} earlier tokens (its attention mask covers "
                    f"{mask2d.shape[1]} positions for {n} new ones) but leanvlm cannot see a KV cache among "
                    f"the arguments of {type(module).__name__}; the reduced cache would be read with the "
                    "wrong layout, so it stops here"
                )
            if past is not None and mask_past > 0 and mask_past != past_len:
                raise LeanVLMError(
                    f"the attention mask covers {mask2d.shape[1]} positions but the KV cache holds {past_len} "
                    f"tokens before these {n}; pass the mask of the whole sequence so far"
                )
            if past is not None and past_len == 0:
                check_cache(past)  # refuse a cache that can not hold reduced layers before any work

        if past_len == 0 and mask_past == 0:
            if self.stages:
                self._check_checkpointing()
            return self._begin_prefill(kwargs, b, n, device, valid, visual, past, placeholders)
        entry = get_kv_record(past)
        if entry is not None and entry[2] != self.layout:
            raise LeanVLMError(
                f"this KV cache was filled with reductions at layers {list(entry[2])} but the applied method "
                f"reduces at layers {list(self.layout)}; continue a cache with the method that filled it"
            )
        # real entries layer 0 attends to: its whole cache and the new tokens, less the padding
        full_keys = (mask2d.sum(-1) if mask_past else valid.sum(-1) + past_len).to(device)
        if not self.stages:
            self.trace.decode.append(DecodeRecord([0], valid.sum(-1), [full_keys], cached=past is not None))
            return None
        if entry is None:
            lengths = set(compat.layer_lengths(past))
            if len(lengths) > 1:
                raise LeanVLMError(
                    f"this KV cache has layers of different lengths {sorted(lengths)} but no record of the "
                    "reduction that filled it; continue it with the model and method that filled it"
                )
            self.trace.decode.append(DecodeRecord([0], valid.sum(-1), [full_keys], cached=True))
            return None
        n_cached, n_prompt, _, kvmaps = entry
        if kvmaps and kvmaps[0].orig.shape[0] != b:
            raise LeanVLMError(
                f"this KV cache was filled by a reduced prefill of {kvmaps[0].orig.shape[0]} samples but "
                f"continues with {b}; batch operations on a reduced cache (repeat, reorder) are not supported"
            )
        if past_len != n_cached:
            kvmaps = self._crop_maps(kvmaps, n_cached, n_prompt, past_len)
        for i, length in enumerate(compat.layer_lengths(past)):
            stage = self.stage_of_layer[i]
            expected = past_len if stage == 0 else kvmaps[stage - 1].orig.shape[1]
            if length != expected:
                raise LeanVLMError(
                    f"layer {i} of this KV cache holds {length} entries where the reduction that filled it "
                    f"left {expected}: the layers were changed unevenly (e.g. cropped to an absolute length, "
                    "which shortens only the longer layers); crop with a negative count, cache.crop(-n)"
                )
        self._call = _Call(
            mode="extend",
            n_input=n,
            valid=valid,
            kvmaps=kvmaps,
            past_len=past_len,
            new_orig=(past_len + torch.arange(n, device=device)).expand(b, n),
            cache=past,
            n_prompt=n_prompt,
        )
        new = valid.sum(-1)
        self.trace.decode.append(
            DecodeRecord(
                [0, *self.layout],
                new,
                [full_keys, *(m.valid.sum(-1) + new for m in kvmaps)],
                cached=True,
            )
        )
        return None

    def _begin_prefill(self, kwargs, b, n, device, valid, visual, past, placeholders):
        """A forward over a sequence with nothing cached: the prefill, or (generate() without a KV cache)
        a recompute of the whole sequence, recorded as a decode step."""
        recompute = self._generate_fresh is not None and self._generate_fresh > 0
        if self._generate_fresh is not None:
            self._generate_fresh += 1
        self.last_trace = self.trace
        if past is not None:
            set_kv_record(past, None)  # a reset or new cache: nothing from an earlier prefill applies
        orig = torch.arange(n, device=device).expand(b, n)
        records = [StageRecord(0, orig, valid, visual)]
        if not recompute:
            self.trace.reset()
            self.trace.vision_inputs = self._vision_inputs
            self.trace.stages = records
        if not (self.stages and bool(visual.any())):
            if recompute:
                self.trace.decode.append(DecodeRecord([0], valid.sum(-1), [valid.sum(-1)], cached=False))
            return None
        prompt_len = self._prompt_len(n, valid)
        self._call = _Call(
            mode="prefill",
            n_input=n,
            valid=valid,
            visual=visual,
            prompt_len=prompt_len,
            visual_counts=visual.sum(-1).tolist(),
            position_ids=compat.mrope_rows(kwargs.get("position_ids")),
            query_rows=self._answer_queries(b, n, device),
            records=records,
            recompute=recompute,
        )
        if any(s.kind == "merge" for s in self.stages):
            ids = self.adapter.image_ids(placeholders, self._vision_inputs)
            self._call.image_ids = ids.masked_fill(~valid, -1)
        return None

    def _check_checkpointing(self) -> None:
        layer = self.adapter.layers[-1]
        if compat.checkpointing_active(layer) and compat.checkpoint_reruns_hooks(layer):
            raise compat.fail(
                "activation checkpointing with a token-reducing method needs transformers >= 5.23: this "
                "release checkpoints each layer's __call__, so the backward pass would replay the layers "
                "without the engine's edits; upgrade transformers or train without checkpointing"
            )

    def _prompt_len(self, n: int, valid: torch.Tensor) -> int:
        """The prompt the query rows come from: ``prompt_length(n)`` / generate()'s input, else everything."""
        if self.prompt_len is None:
            return n
        prompt_len = min(self.prompt_len, n)
        has_tokens = valid.any(-1)
        in_prompt = valid[:, :prompt_len].any(-1)
        bad = (has_tokens & ~in_prompt).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            first = int(valid[row].nonzero()[0, 0])
            raise ConfigError(
                f"prompt_length({self.prompt_len}): sample {row} has no token in its first {prompt_len} "
                f"positions (its first real token is at position {first}, after left padding); count the "
                "padding in, i.e. use the padded prompt length"
            )
        return prompt_len

    def _answer_queries(self, b: int, n: int, device) -> torch.Tensor | None:
        """Training: the token just before each answer span ranks the visual tokens (PyramidDrop's rule):
        the first position of each run of positions that predict a supervised token (from
        ``shift_labels`` when given, as the loss)."""
        labels, shift_labels = self._labels, self._shift_labels
        has_labels = labels is not None and labels.shape == (b, n)
        supervised = (labels.to(device) != IGNORE_INDEX) if has_labels else None  # each token is a target
        if shift_labels is not None and shift_labels.shape == (b, n):
            predicts = shift_labels.to(device) != IGNORE_INDEX  # each position predicts a target
            own = torch.zeros_like(predicts)
            own[:, 1:] = predicts[:, :-1]
            if has_labels:
                own[:, 0] = supervised[:, 0]
        elif has_labels:
            predicts = torch.zeros_like(supervised)
            predicts[:, :-1] = supervised[:, 1:]
            own = supervised
        else:
            return None
        return predicts & ~own

    def _text_post(self, module, args, kwargs, output):
        call, self._call = self._call, None
        if call is None:
            return None
        if call.mode == "prefill":
            if call.recompute:
                self.trace.decode.append(
                    DecodeRecord(
                        [r.layer for r in call.records],
                        call.valid.sum(-1),
                        [r.valid.sum(-1) for r in call.records],
                        cached=False,
                    )
                )
            if call.reduced:
                self._final = (call.state.orig, call.state.valid)
            returned = compat.output_cache(output)
            if call.reduced and returned is not None and returned is not call.cache:
                raise compat.fail(
                    "the language model returned a KV cache that its decoder layers were not seen to fill; "
                    "decoding from it would ignore the reduction"
                )
            if call.cache is not None and call.reduced:
                kvmaps = [KVMap(s.orig, s.valid, s.shift) for s in call.stage_states]
                if compat.cache_length(call.cache) == call.n_input:
                    # tokens past the prompt (draft tokens of assisted / prompt-lookup decoding that
                    # generate() sends with the prompt) are not prompt: a cache may be cropped back to it
                    set_kv_record(call.cache, (call.n_input, call.prompt_len, self.layout, kvmaps))
        elif compat.cache_length(call.cache) == call.past_len + call.n_input:
            kvmaps = [
                KVMap(torch.cat([m.orig, call.new_orig], -1), torch.cat([m.valid, call.valid], -1), m.shift)
                for m in call.kvmaps
            ]
            set_kv_record(call.cache, (call.past_len + call.n_input, call.n_prompt, self.layout, kvmaps))
        return None

    @staticmethod
    def _crop_maps(kvmaps: list[KVMap], n_cached: int, n_prompt: int, past_len: int) -> list[KVMap]:
        """The cache was cropped (e.g. rejected draft tokens): drop the same trailing entries."""
        if past_len > n_cached:
            raise LeanVLMError(
                f"the KV cache holds {past_len} tokens but only {n_cached} went in through leanvlm's hooks; "
                "a cache filled by a reduced prefill must only grow through the same model"
            )
        if past_len < n_prompt:
            raise LeanVLMError(
                f"the KV cache was cropped to {past_len} tokens, into the reduced {n_prompt}-token prompt; "
                "run the prefill again"
            )
        cut = n_cached - past_len  # generated tokens are never dropped: they are the last entries
        return [
            KVMap(m.orig[:, : m.orig.shape[1] - cut], m.valid[:, : m.valid.shape[1] - cut], m.shift)
            for m in kvmaps
        ]

    # --- decoder layers --------------------------------------------------------------------------------
    def _layer_hook(self, layer_idx: int, module, args, kwargs):
        call = self._call
        if call is None:
            return None
        if call.mode == "prefill":
            return self._prefill_layer(layer_idx, call, args, kwargs)
        return self._extend_layer(layer_idx, call, args, kwargs)

    def _prefill_layer(self, layer_idx, call: _Call, args, kwargs):
        hidden = compat.layer_hidden(args, kwargs)
        if call.state is None:
            b, n = hidden.shape[:2]
            cos, sin = compat.layer_rotary(kwargs)
            call.cache = compat.find_cache(args, kwargs)
            check_cache(call.cache)
            call.state = TokenState(
                orig=torch.arange(n, device=hidden.device).expand(b, n),
                valid=call.valid,
                visual=call.visual,
                # the ids the rotary tables come from: the stack's input (M-RoPE rows) over the layer's copy
                pos=expand_positions(
                    call.position_ids if call.position_ids is not None else kwargs.get("position_ids"),
                    b,
                    n,
                    hidden.device,
                ),
                cos=cos.expand(b, -1, -1),
                sin=sin.expand(b, -1, -1),
                shift=torch.zeros(b, dtype=torch.long, device=hidden.device),
            )
        for si in self.score_at.get(layer_idx, ()):
            call.scores[si] = self._score(layer_idx, hidden, call.state, call)
        if layer_idx in self.reduce_at:
            si = self.reduce_at[layer_idx]
            reduce = self._drop if self.stages[si].kind == "drop" else self._merge
            hidden, call.state = reduce(si, hidden, call)
            call.stage_states.append(call.state)
            s = call.state
            call.records.append(StageRecord(layer_idx, s.orig, s.valid, s.visual))
        if not call.reduced:
            return None
        s = call.state
        kwargs["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"), s, call)
        kwargs["position_embeddings"] = (s.cos, s.sin)
        layer_pos = kwargs.get("position_ids")
        if layer_pos is not None:  # models that pass none keep passing none; Qwen-VL passes a text row
            same_format = layer_pos.dim() == s.pos.dim()
            kwargs["position_ids"] = (
                s.pos if same_format else gather_positions(layer_pos.expand_as(call.valid), s.orig)
            )
        return compat.set_layer_hidden(args, kwargs, hidden)

    def _score(self, layer_idx: int, hidden: torch.Tensor, s: TokenState, call: _Call) -> torch.Tensor:
        """[B, n] attention each slot receives from the query rows: the last prompt token or the prompt's
        text (inference), or the token before each answer span (training, when labels are given)."""
        n = s.orig.shape[1]
        slots = torch.arange(n, device=hidden.device).expand_as(s.orig)
        in_prompt = s.valid & (s.orig < call.prompt_len)
        if call.query_rows is not None:
            query_slots, weight = compact_indices(call.query_rows.gather(1, s.orig) & s.valid)
        elif self.query == "last":
            query_slots = torch.where(in_prompt, slots, -1).max(-1).values[:, None]  # [B, 1]
            weight = query_slots >= 0  # a row of padding only (all-zero attention mask) has no query
            query_slots = query_slots.clamp_min(0)
        else:
            query_slots, weight = compact_indices(in_prompt & ~s.visual)  # [B, Q]
        if query_slots.shape[1] == 0:  # no sample has a query row (e.g. every token supervised): no ranking
            return torch.zeros(s.orig.shape, device=hidden.device)
        with torch.no_grad():
            q, k, scaling = self.adapter.query_key(layer_idx, hidden.detach(), s.cos, s.sin, query_slots)
            visible = build_bool_mask(s.orig.gather(1, query_slots), s.orig, s.valid)[:, 0]  # [B, Q, n]
            probs = attention_to_keys(q, k, visible, scaling)
            if not call.recompute:
                self.trace.scoring.append(ScoreRecord(layer_idx, s.valid.sum(-1), weight.sum(-1)))
            return mean_query_scores(probs, weight)

    def _drop(self, stage_idx: int, hidden: torch.Tensor, call: _Call):
        stage = self.stages[stage_idx]
        s = call.state
        scores = call.scores.pop(stage_idx)
        candidates = s.visual & s.valid
        # The last prompt token is what generation continues from (and the usual query): never drop it,
        # even when the prompt ends with an image.
        slots = torch.arange(s.orig.shape[1], device=hidden.device).expand_as(s.orig)
        last = torch.where(s.valid & (s.orig < call.prompt_len), slots, -1).max(-1, keepdim=True).values
        last_is_visual = candidates.gather(1, last.clamp_min(0))[:, 0]
        candidates = candidates & (slots != last)
        wanted = torch.tensor([stage.keep(n) for n in call.visual_counts], device=hidden.device)
        wanted = (wanted - last_is_visual.long()).clamp_min(0)  # the kept last token uses up budget
        if call.query_rows is not None:  # training: a sample without an answer span has no query; keep all
            wanted = torch.where(call.query_rows.any(-1), wanted, candidates.sum(-1))
        keep = topk_keep(scores, candidates, torch.minimum(wanted, candidates.sum(-1)))
        if bool(keep.all()):
            return hidden, s
        index, present = compact_indices(keep)  # [B, m]
        dropped = candidates & ~keep
        hidden = gather_rows(hidden, index)
        pos = gather_positions(s.pos, index)
        if self.positions == "compact":
            pos = pos - gather_positions(dropped.long().cumsum(-1), index)
            pos = pos.masked_fill(~present, 0)
            cos, sin = self.adapter.rotary(hidden, pos)
        else:
            cos, sin = gather_rows(s.cos, index), gather_rows(s.sin, index)
        call.reduced = True
        new = s.select(index, present, pos=pos, cos=cos, sin=sin, shift=s.shift + dropped.sum(-1))
        return hidden, new

    def _merge(self, stage_idx: int, hidden: torch.Tensor, call: _Call):
        """Average-pool groups of neighbouring visual tokens; each group's first slot carries the mean."""
        stage = self.stages[stage_idx]
        s = call.state
        leader = self._merge_groups(stage, s, call)  # [B, n] slot index of each slot's group leader
        if bool((leader == torch.arange(leader.shape[1], device=leader.device)).all()):
            return hidden, s
        b, n, d = hidden.shape
        ones = torch.ones(b, n, 1, dtype=hidden.dtype, device=hidden.device)
        counts = torch.zeros_like(ones).scatter_add_(1, leader[..., None], ones)  # [B, n, 1]
        keep = leader == torch.arange(n, device=hidden.device)
        index, present = compact_indices(keep)

        def pool(h):
            sums = torch.zeros_like(h).scatter_add_(1, leader[..., None].expand(-1, -1, d), h)
            return gather_rows(sums / counts.clamp_min(1), index)

        hidden = pool(hidden)
        if stage.merge_position == "mean":
            pos = s.pos.float()
            lead = leader.expand(*pos.shape[:-2], b, n)
            pos_sum = torch.zeros_like(pos).scatter_add_(-1, lead, pos)
            pos = torch.floor(pos_sum / counts[..., 0].clamp_min(1)).long()
        else:
            pos = s.pos
        pos = gather_positions(pos, index)
        cos, sin = self.adapter.rotary(hidden, pos)
        call.reduced = True
        new = s.select(index, present, pos=pos, cos=cos, sin=sin, shift=s.shift)
        return hidden, new

    def _merge_groups(self, stage, s: TokenState, call: _Call) -> torch.Tensor:
        """[B, n]: for each slot, the slot that leads its group (itself for tokens that are not merged).

        The adapter says which image each visual token belongs to (two images back to back are two
        images); "1d" groups ``stride`` consecutive tokens of an image, "2d" groups square blocks of the
        image's grid (the adapter's fixed grid). The last prompt token is never merged: generation
        continues from it, even when the prompt ends with an image."""
        b, n = s.orig.shape
        leader = torch.arange(n, device=s.orig.device).expand(b, n).clone()
        slots = torch.arange(n, device=s.orig.device).expand(b, n)
        last = torch.where(s.valid & (s.orig < call.prompt_len), slots, -1).max(-1).values.tolist()
        image = call.image_ids.gather(1, s.orig).masked_fill(~(s.visual & s.valid), -1).tolist()
        grid = self.adapter.fixed_grid if stage.pool == "2d" else None
        side = math.isqrt(stage.stride)
        for bi in range(b):
            members: dict[int, list[int]] = {}
            for j, img in enumerate(image[bi]):
                if img >= 0:
                    members.setdefault(img, []).append(j)
            for img, idx in members.items():
                length = len(idx)
                if grid is None:
                    stride = min(stage.stride, length)
                    offsets = [k // stride * stride for k in range(length)]
                else:
                    rows, cols = grid
                    if rows * cols != length:
                        raise LeanVLMError(
                            f"2-D pooling: image {img} has {length} visual tokens, which does not match its "
                            f"{rows}x{cols} grid"
                        )
                    offsets = [
                        (k // cols) // side * side * cols + (k % cols) // side * side for k in range(length)
                    ]
                for k, o in zip(idx, offsets, strict=True):
                    leader[bi, k] = idx[o]
            if last[bi] >= 0 and image[bi][last[bi]] >= 0:
                # the last prompt token is visual: it stays on its own; its group is led by the next member
                group = (leader[bi] == leader[bi, last[bi]]).nonzero()[:, 0]
                rest = group[group != last[bi]]
                if len(rest):
                    leader[bi, rest] = rest[0]
                leader[bi, last[bi]] = last[bi]
        return leader

    def _prefill_mask(self, mask, s: TokenState, call: _Call):
        key = (id(s), id(mask))
        if key not in call.masks:
            kind = compat.mask_kind(mask)
            if kind == "none":
                if bool(s.valid.all()):
                    out = None  # causal over the kept tokens, in order: the kernel's is_causal is right
                else:
                    out = self._fresh_mask(build_bool_mask(s.orig, s.orig, s.valid), s.cos.dtype)
            elif kind == "padding":
                out = mask_keys(gather_mask(mask, None, s.orig), s.valid)
            else:
                out = mask_keys(gather_mask(mask, s.orig, s.orig), s.valid)
            call.masks[key] = out
        return call.masks[key]

    def _fresh_mask(self, bool_mask: torch.Tensor, dtype: torch.dtype):
        return to_layer_format(bool_mask, self.adapter.attn_implementation, dtype)

    def _extend_layer(self, layer_idx, call: _Call, args, kwargs):
        stage = self.stage_of_layer[layer_idx]
        if stage == 0:
            return None
        m = call.kvmaps[stage - 1]
        mask = kwargs.get("attention_mask")
        key = (stage, id(mask))
        if key not in call.masks:
            k_orig = torch.cat([m.orig, call.new_orig], -1)
            k_valid = torch.cat([m.valid, call.valid], -1)
            if compat.mask_kind(mask) == "none":
                if call.n_input == 1 and bool(k_valid.all()):
                    out = None
                else:
                    cos = compat.layer_rotary(kwargs)[0]
                    out = self._fresh_mask(build_bool_mask(call.new_orig, k_orig, k_valid), cos.dtype)
            else:
                out = mask_keys(gather_mask(mask, None, k_orig), k_valid)
            call.masks[key] = out
        kwargs["attention_mask"] = call.masks[key]
        if self.positions == "compact":
            if stage not in call.rope:
                hidden = compat.layer_hidden(args, kwargs)
                b, n = hidden.shape[:2]
                pos = expand_positions(kwargs.get("position_ids"), b, n, hidden.device) - m.shift[:, None]
                call.rope[stage] = (pos, self.adapter.rotary(hidden, pos))
            pos, rope = call.rope[stage]
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = pos
            kwargs["position_embeddings"] = rope
        return args, kwargs
