"""The engine: runs methods' plans through a stock transformers forward. Plumbing only: which tokens to
keep, merge or insert is each method's algorithm (``methods/``); the engine applies the edits it gets
back (:mod:`.edits`) and keeps masks, positions, the KV cache's record and the trace consistent.

It never copies a model's forward. Hooks on these places do the work:

* the VLM module (pre-hook): sees ``input_ids`` and records which positions are visual tokens;
* the top model (pre / post): takes the labels, so the loss is computed on the tokens that are left;
* the LLM decoder stack (pre / post): a fresh prefill (edits run) or an extension of a cache an earlier
  prefill edited (new tokens attend to what each layer kept); input-stage steps (layer 0) run here, on
  the embeddings, and the model's own mask and positions are rebuilt for the shorter sequence;
* decoder layers (pre-hooks): steps observe and edit; later layers get the edited mask / positions;
* replaced layers (an instance ``forward`` that dispatches to the method's runner during its calls).

Everything the hooks read of transformers' calling conventions goes through :mod:`leanvlm.compat`.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from .. import compat
from ..errors import LeanVLMError, UnsupportedModelError
from .cache import check_cache, get_kv_record, set_kv_record
from .context import TOWER_TOKENS, Context, VisionContext
from .edits import Merge, apply_edit
from .layers import extend_mask, layer_position_ids, next_positions, prefill_mask
from .local import PerThread, prompt_length_of, remove_hook
from .plan import Replace, Step, Vision, VisionRun, check_plan, check_runners
from .state import KVMap, KVRecord, TokenState, expand_positions
from .trace import DecodeRecord, StageRecord, Trace, merged_carrier
from .training import answer_queries, next_token_targets

VISION_KEYS = ("image_sizes", "image_grid_thw", "video_grid_thw")


@dataclass
class _Call:
    """Per-forward bookkeeping."""

    mode: str  # "prefill" or "extend"
    n_input: int
    valid: torch.Tensor  # [B, N] of the call's own tokens
    placeholders: torch.Tensor | None = None  # [B, N] every image's placeholders (padded rows' too)
    vision_inputs: dict | None = None
    query_rows: torch.Tensor | None = None  # [B, N] training queries: the token before each answer span
    image_ids: torch.Tensor | None = None
    prompt_len: int = 0
    visual_counts: list[int] = field(default_factory=list)
    state: TokenState | None = None
    has_visual: bool = True  # steps run only when the batch has visual tokens (runners always run)
    edited: bool = False  # some edit changed the token set (the cache needs a record)
    reduced: bool = False  # layers see other slots than the model's layer 0 (masks / positions handed in)
    stage_states: list[TokenState] = field(default_factory=list)
    observed: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    rope: dict = field(default_factory=dict)
    cache: object | None = None
    #: where this call's stage records go: the trace's prefill, or a decode record when generate()
    #: runs without a KV cache and recomputes the whole sequence at every step after the first
    records: list[StageRecord] = field(default_factory=list)
    recompute: bool = False
    vision: dict = field(default_factory=dict)  # what vision steps stored for this call
    #: each sample's copies in the batch when generate() repeated the samples (beams, several returned
    #: sequences) after the vision tower ran on the original ones (transformers >= 5.23)
    replicas: int = 1
    tower_inputs: dict | None = None  # the image layout the vision tower ran on (the original samples')
    shared: dict = field(default_factory=dict)  # what the call's steps hand each other (ctx.shared)
    next_pos: torch.Tensor | None = None  # [B] position after the input's last token
    pos_rows: int = 0
    carrier: torch.Tensor | None = None  # [B, N] which token carries each input token (StageRecord)
    # extend mode
    record: KVRecord | None = None
    kvmaps: list[KVMap] = field(default_factory=list)
    past_len: int = 0
    new_orig: torch.Tensor | None = None
    new_pos: torch.Tensor | None = None  # input-stage caches: the new tokens' positions, computed here


def _clock(device: torch.device) -> float:
    """A timestamp after the device's queued work (for timing the methods' own work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Engine:
    """Installs the plans of the applied methods (none: it only records the trace).

    Everything about a forward in flight (and the trace of the last one) is per thread."""

    trace = PerThread(factory=lambda engine: Trace(num_layers=engine.adapter.num_layers))
    prompt_len = PerThread()
    _visual = PerThread()
    _labels = PerThread()
    _shift_labels = PerThread()
    _vision_inputs = PerThread()
    _vision_store = PerThread()
    _vision_ms = PerThread()  # time of this call's vision steps (they may run before the prefill begins)
    _final = PerThread()
    _call = PerThread()
    #: inside generate(): how many fresh (uncached) forwards of the decoder stack it has run
    _generate_fresh = PerThread()
    #: inside generate(): its image-layout arguments (generate() may encode the images before its loop
    #: and leave them out of the forwards); None outside generate()
    _generate_vision = PerThread()
    _generate_batch = PerThread()
    _replicas = PerThread()
    _tower_inputs = PerThread()
    #: losses the methods add to the model's loss in this call (``ctx.add_loss``)
    _losses = PerThread(factory=lambda engine: [])

    #: time the methods' work before the LLM into ``trace.selection_ms`` (synchronises the device there)
    time_selection = False

    def __init__(self, adapter, methods=()):
        self._local = threading.local()
        self.adapter = adapter
        self.methods = tuple(methods)
        self._plan()
        self._stale = False
        #: (module, "pre" | "post", hook id) of every hook installed; every hook is a bound method of the
        #: engine (or a partial of one), so that a deep copy of the model gets a copy of the engine
        self._hooked: list[tuple[torch.nn.Module, str, int]] = []
        self._replaced: list[torch.nn.Module] = []
        self._patched_generate = False
        #: the trace of the last prefill in any thread (what a thread that ran none sees)
        self.last_trace: Trace | None = None
        #: called with the engine of a deep copy of the model (the API registers the copy's handle)
        self.on_copy = None

    def _plan(self) -> None:
        """Ask every method for its plan (on this engine's adapter: a deep copy of the model re-plans, so
        steps reach the copy's own modules) and index the steps by layer."""
        adapter, n_layers = self.adapter, self.adapter.num_layers
        plans = []
        for m in self.methods:
            if not m.is_noop:
                plans.append((m.describe(), list(m.plan(adapter))))
                check_plan(m, plans[-1][1], n_layers, lambda: len(adapter.vision_layers))
        check_runners(plans)
        items = [item for _, plan in plans for item in plan]
        steps = sorted((s for s in items if isinstance(s, Step)), key=lambda s: s.layer)
        self.steps = steps
        self.edits_at: dict[int, list[int]] = {}
        self.observe_at: dict[int, list[int]] = {}
        for k, s in enumerate(steps):
            self.edits_at.setdefault(s.layer, []).append(k)
            if s.observe is not None:
                self.observe_at.setdefault(s.observe_layer, []).append(k)
        self.runners = {i: r for r in items if isinstance(r, Replace) for i in range(r.start, r.end)}
        self.vision_at: dict[int, list[Vision]] = {}
        for v in (v for v in items if isinstance(v, Vision)):
            self.vision_at.setdefault(v.layer, []).append(v)
        self.vision_runners = {i: r for r in items if isinstance(r, VisionRun) for i in range(r.start, r.end)}
        #: the layers where a stage of the KV cache begins (stored with a cache it filled)
        self.layout = tuple(sorted({s.layer for s in steps}))
        self.stage_of_layer = [sum(s <= i for s in self.layout) for i in range(n_layers)]
        self.input_stage = 0 in self.layout
        self.active = bool(steps or self.runners or self.vision_at or self.vision_runners)
        #: the decoding-stage method, whose loop generate() runs (through leanvlm.generation.generate)
        self.decoder = next((m for m in self.methods if m.stage == "decode" and not m.is_noop), None)
        hooked = [*self.layout, *self.observe_at, *self.runners]
        self.first_layer = min(hooked) if hooked else n_layers  # the first decoder layer hooked

    def _replan(self) -> None:
        self._plan()
        self._stale = False

    # --- install / remove ---------------------------------------------------------------------------
    def install(self) -> None:
        a = self.adapter
        for i in range(self.first_layer, a.num_layers):
            compat.check_decoder_layer(a.layers[i])
        self._hook(a.vlm_model, "pre", self._vlm_pre)
        self._hook(a.model, "pre", self._top_pre)
        self._hook(a.model, "post", self._top_post)
        self._hook(a.text_model, "pre", self._text_pre)
        self._hook(a.text_model, "post", self._text_post)
        if self.active:
            for i in range(self.first_layer, a.num_layers):
                self._hook(a.layers[i], "pre", functools.partial(self._layer_hook, i))
        for i in sorted(self.vision_at):
            self._hook(a.vision_layers[i], "pre", functools.partial(self._vision_hook, i))
        for i in sorted(self.runners):
            a.layers[i].forward = functools.partial(self._replaced_forward, i, a.layers[i])
            self._replaced.append(a.layers[i])
        for i in sorted(self.vision_runners):
            layer = a.vision_layers[i]
            layer.forward = functools.partial(self._vision_run_forward, i, layer)
            self._replaced.append(layer)
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
            remove_hook(module, kind, hook_id)
        self._hooked.clear()
        for layer in self._replaced:
            layer.__dict__.pop("forward", None)
        self._replaced.clear()
        if self._patched_generate:
            del self.adapter.model.generate
            self._patched_generate = False
        self._call = None
        self._visual = None

    def __deepcopy__(self, memo):
        """A deep copy of an applied model gets its own engine, driving the copy's hooks. A deep copy of
        one hooked submodule alone keeps pointing at this engine, whose hooks do nothing on modules that
        are not this model's (each checks the module it is called on), instead of dragging a copy of the
        whole model along."""
        if id(self.adapter.model) not in memo:
            return self
        new = copy.copy(self)
        memo[id(self)] = new
        new._local = threading.local()
        new.last_trace = None
        new.adapter = copy.deepcopy(self.adapter, memo)
        new._hooked = [(copy.deepcopy(m, memo), kind, hook_id) for m, kind, hook_id in self._hooked]
        new._replaced = [copy.deepcopy(m, memo) for m in self._replaced]
        # the methods' steps may hold the original's modules (trainable parts): plan again for the copy,
        # on its first call (the copied model is still being built here)
        new._stale = True
        if self.on_copy is not None:
            self.on_copy(new)
        return new

    def _generate(self, model, *args, **kwargs):
        inputs = kwargs.get("inputs", kwargs.get("input_ids", args[0] if args else None))
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        # generate() may run inside prompt_length() or itself
        fields = (
            "prompt_len",
            "_generate_fresh",
            "_generate_vision",
            "_generate_batch",
            "_vision_store",
            "_vision_ms",
            "_vision_inputs",
        )
        saved = {name: getattr(self, name) for name in fields}
        self.prompt_len = inputs.shape[1] if inputs is not None else None
        self._generate_batch = inputs.shape[0] if inputs is not None else None
        self._generate_fresh = 0
        self._generate_vision = {k: kwargs[k] for k in VISION_KEYS if kwargs.get(k) is not None}
        # the tower may run before the first forward (transformers >= 5.23): its steps see these
        self._vision_store = {}
        self._vision_ms = 0.0
        self._vision_inputs = dict(self._generate_vision)
        if self.decoder is not None and kwargs.get("custom_generate") is None:
            from ..generation import generate as entry

            kwargs["custom_generate"] = entry  # the decoding-stage method's loop, inside stock generate()
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    # --- hooks on the VLM and the top model ----------------------------------------------------------
    def _vlm_pre(self, module, args, kwargs):
        if module is not self.adapter.vlm_model:
            return None  # a deep copy of this module alone: not this model's call
        if self._stale:
            self._replan()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            self._visual = None
            return
        self._visual = self.adapter.visual_mask(input_ids, embeds)
        in_generate = self._generate_vision is not None
        tower_runs = compat.runs_vision_tower(kwargs)
        if tower_runs or not in_generate:
            # this call's vision steps write here (the tower runs inside this call); inside generate()
            # without pixels, the images were encoded before its loop and what their steps stored stands
            self._vision_store = {}
            self._vision_ms = 0.0
        rows, first = self._visual.shape[0], self._generate_batch
        self._replicas = 1
        given = {k: kwargs[k] for k in VISION_KEYS if kwargs.get(k) is not None}
        layout = self._generate_vision or {}
        self._tower_inputs = {**layout, **given}
        if in_generate and not tower_runs and first and rows != first:
            # generate() repeated each sample after encoding the images: the layout it was given describes
            # the original samples' images (steps map each copy back to its original, ``ctx.replicas``)
            self._replicas = rows // first if rows % first == 0 else 1
            layout = {}
        self._vision_inputs = {**layout, **given}
        self._vision_inputs["input_ids"] = input_ids if input_ids is not None else embeds[..., 0]
        self._vision_inputs["has_input_ids"] = input_ids is not None
        past = compat.find_cache(args, kwargs)
        fresh = (
            embeds is not None and embeds.shape[1] > 1 and (past is None or compat.cache_length(past) == 0)
        )
        if input_ids is None and self.active and fresh and not bool(self._visual.any()):
            warnings.warn(
                "leanvlm found no visual-token placeholders in inputs_embeds, so nothing is dropped; "
                "pass input_ids (with pixel_values) to let the method locate the visual tokens",
                stacklevel=2,
            )

    def _top_pre(self, module, args, kwargs):
        if module is not self.adapter.model:
            return None
        if self._stale:
            self._replan()
        self._losses = []
        # The model's logits may cover other tokens than its input: take the labels, and compute the loss
        # against the targets of the slots the last layer had (_top_post).
        if not self.layout or kwargs.get("labels") is None:
            self._labels = self._shift_labels = None
            return None
        self._labels = kwargs.pop("labels")
        self._shift_labels = kwargs.pop("shift_labels", None)
        return args, kwargs

    def _top_post(self, module, args, kwargs, output):
        if module is not self.adapter.model:
            return None
        labels, self._labels = self._labels, None
        shift_labels, self._shift_labels = self._shift_labels, None
        extra, self._losses = self._losses, []
        if labels is None:
            if extra and getattr(output, "loss", None) is not None:
                output.loss = output.loss + sum(extra)
                return output
            return None
        if not hasattr(output, "logits"):
            raise UnsupportedModelError("labels with a token-reducing method need return_dict=True outputs")
        if self._final is not None:
            shift_labels = next_token_targets(labels, shift_labels, self._final)
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if kwargs.get(k) is not None}
        output.loss = compat.causal_lm_loss(
            module, output.logits, labels=labels, shift_labels=shift_labels, **loss_kwargs
        )
        if extra:
            output.loss = output.loss + sum(extra)
        return output

    # --- the decoder stack ---------------------------------------------------------------------------
    def _text_pre(self, module, args, kwargs):
        if module is not self.adapter.text_model:
            return None
        if self._stale:
            self._replan()
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
        record = get_kv_record(past) if past_len else None
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
        placeholders = visual.to(device)
        visual = placeholders & valid

        if self.layout:
            if past is None and mask_past > 0:
                raise compat.fail(
                    f"this forward continues {mask_past} earlier tokens (its attention mask covers "
                    f"{mask2d.shape[1]} positions for {n} new ones) but leanvlm cannot see a KV cache among "
                    f"the arguments of {type(module).__name__}; the reduced cache would be read with the "
                    "wrong layout, so it stops here"
                )
            covered = past_len + (record.n_orig - record.n_cached if record is not None else 0)
            if past is not None and mask_past > 0 and mask_past != covered:
                raise LeanVLMError(
                    f"the attention mask covers {mask2d.shape[1]} positions but the KV cache holds {covered} "
                    f"tokens before these {n}; pass the mask of the whole sequence so far"
                )
            if past is not None and past_len == 0:
                check_cache(past)  # refuse a cache that can not hold reduced layers before any work

        if past_len == 0 and mask_past == 0:
            if self.layout or self.runners or self.vision_runners:
                self._check_checkpointing()
            return self._begin_prefill(args, kwargs, b, n, device, valid, visual, past, placeholders)
        return self._begin_extend(
            args, kwargs, b, n, device, valid, past, past_len, mask2d, mask_past, record
        )

    def _begin_extend(self, args, kwargs, b, n, device, valid, past, past_len, mask2d, mask_past, record):
        if record is not None and record.layout != self.layout:
            raise LeanVLMError(
                f"this KV cache was filled with reductions at layers {list(record.layout)} but the applied "
                f"methods reduce at layers {list(self.layout)}; continue a cache with the method that filled it"
            )
        # real entries layer 0 attends to: its whole cache and the new tokens, less the padding
        full_keys = (mask2d.sum(-1) if mask_past else valid.sum(-1) + past_len).to(device)
        plain = DecodeRecord([0], valid.sum(-1), [full_keys], cached=past is not None)
        if record is None and self.layout and past is not None:
            lengths = set(compat.layer_lengths(past))
            if len(lengths) > 1:
                raise LeanVLMError(
                    f"this KV cache has layers of different lengths {sorted(lengths)} but no record of the "
                    "reduction that filled it; continue it with the model and method that filled it"
                )
        if record is None:
            self.trace.decode.append(plain)
            if self.runners:  # runners compute their layers in decode steps too
                new_orig = (past_len + torch.arange(n, device=device)).expand(b, n)
                self._call = _Call(
                    mode="extend", n_input=n, valid=valid, past_len=past_len, new_orig=new_orig
                )
            return None
        if record.kvmaps[0].orig.shape[0] != b:
            raise LeanVLMError(
                f"this KV cache was filled by a reduced prefill of {record.kvmaps[0].orig.shape[0]} samples "
                f"but continues with {b}; batch operations on a reduced cache (repeat, reorder) are not supported"
            )
        if past_len != record.n_cached:
            record = record.cropped(past_len)
        for i, length in enumerate(compat.layer_lengths(past)):
            stage = self.stage_of_layer[i]
            expected = past_len if stage == 0 else record.kvmaps[stage - 1].orig.shape[1]
            if length != expected:
                raise LeanVLMError(
                    f"layer {i} of this KV cache holds {length} entries where the reduction that filled it "
                    f"left {expected}: the layers were changed unevenly (e.g. cropped to an absolute length, "
                    "which shortens only the longer layers); crop with a negative count, cache.crop(-n)"
                )
        call = _Call(
            mode="extend",
            n_input=n,
            valid=valid,
            record=record,
            kvmaps=record.kvmaps,
            past_len=past_len,
            new_orig=(record.n_orig + torch.arange(n, device=device)).expand(b, n),
            cache=past,
        )
        self._call = call
        new = valid.sum(-1)
        keys = [m.valid.sum(-1) + new for m in record.kvmaps]
        layers = list(self.layout) if self.input_stage else [0, *self.layout]
        self.trace.decode.append(
            DecodeRecord(layers, new, keys if self.input_stage else [full_keys, *keys], cached=True)
        )
        if not self.input_stage:
            return None
        # layer 0 cached fewer entries than the sequence has tokens: hand the model a mask in the cache's
        # layout, and compute the new tokens' positions from the record (the model would count the cache)
        call.new_pos = next_positions(record.next_pos, valid, record.pos_rows)
        if not mask_past:
            return None
        first = record.kvmaps[0]
        past_mask = mask2d[:, :mask_past].gather(1, first.orig) * first.valid.to(mask2d.dtype)
        kwargs["attention_mask"] = torch.cat([past_mask, mask2d[:, mask_past:]], -1)
        return args, kwargs

    def _begin_prefill(self, args, kwargs, b, n, device, valid, visual, past, placeholders):
        """A forward over a sequence with nothing cached: the prefill, or (generate() without a KV cache)
        a recompute of the whole sequence, recorded as a decode step."""
        recompute = self._generate_fresh is not None and self._generate_fresh > 0
        if self._generate_fresh is not None:
            self._generate_fresh += 1
        self.last_trace = self.trace
        if past is not None:
            set_kv_record(past, None)  # a reset or new cache: nothing from an earlier prefill applies
        given_pos = kwargs.get("position_ids")
        pos = expand_positions(compat.mrope_rows(given_pos), b, n, device)
        state = TokenState.initial(valid, visual, pos)
        records = [StageRecord(0, state.orig, valid, visual)]
        if not recompute:
            self.trace.reset()
            self.trace.selection_ms = self._vision_ms or 0.0
            self.trace.vision_inputs = self._vision_inputs
            self.trace.tower_tokens = dict((self._vision_store or {}).get(TOWER_TOKENS, {}))
            self.trace.stages = records
            ids = functools.partial(self.adapter.image_ids, placeholders, self._vision_inputs)
            self.trace.image_ids_of = functools.cache(lambda: ids().masked_fill(~valid, -1))
        has_visual = bool(visual.any())
        if not (self.active and (has_visual or self.runners)):
            if recompute:
                self.trace.decode.append(DecodeRecord([0], valid.sum(-1), [valid.sum(-1)], cached=False))
            return None
        rows = pos.shape[0] if pos.dim() == 3 else 0
        last_pos = (pos if rows else pos[None]).masked_fill(~valid, -1).amax(dim=(0, -1))
        call = _Call(
            mode="prefill",
            n_input=n,
            valid=valid,
            placeholders=placeholders,
            vision_inputs=self._vision_inputs,
            prompt_len=prompt_length_of(self.prompt_len, n, valid),
            visual_counts=visual.sum(-1).tolist(),
            query_rows=answer_queries(self._labels, self._shift_labels, b, n, device),
            state=state,
            has_visual=has_visual,
            vision=self._vision_store or {},
            replicas=self._replicas or 1,
            tower_inputs=self._tower_inputs,
            records=records,
            recompute=recompute,
            next_pos=last_pos + 1,
            pos_rows=rows,
        )
        self._call = call
        if not self.input_stage:
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise UnsupportedModelError(
                f"{type(self.adapter.text_model).__name__} was called with input_ids; an input-stage method "
                "needs the embeddings the VLM builds (inputs_embeds)"
            )
        hidden = self._run_steps(0, embeds, call, observe=False)
        if not call.edited:
            return None
        s = call.state
        call.visual_counts = s.visual.sum(-1).tolist()  # what entered the LLM is what later steps budget
        mask = kwargs.get("attention_mask")
        if compat.mask_kind(mask) not in ("none", "padding"):
            raise UnsupportedModelError(
                "an input-stage method needs a 2-D attention mask (or none); got a 4-D mask"
            )
        kwargs["inputs_embeds"] = hidden
        # always a 2-D mask: without one, transformers reads position ids that skip or repeat (kept
        # tokens keep their positions) as sequences packed together and stops attention at each jump
        kwargs["attention_mask"] = s.valid.long() if mask is None else mask.gather(1, s.orig) * s.valid
        if given_pos is not None and given_pos.dim() == 3 and given_pos.shape[0] == s.pos.shape[0] + 1:
            text_row = given_pos[:1].expand(1, b, n).gather(-1, s.orig[None])  # 5.x: a text row in front
            kwargs["position_ids"] = torch.cat([text_row, s.pos], 0)
        else:
            kwargs["position_ids"] = s.pos
        # from here on the model's own layer-0 sequence is the edited one
        s.base = s.slots
        return args, kwargs

    def _run_steps(self, layer_idx: int, hidden: torch.Tensor, call: _Call, *, observe=True, edit=True):
        """Observe and edit at the input of ``layer_idx`` (layer 0's edits run before the LLM, on the
        embeddings, its observers on the layer's input); a stage boundary records the token state."""
        if not call.has_visual:
            observe = edit = False
        has_work = bool(self.observe_at.get(layer_idx) or self.edits_at.get(layer_idx))
        timed = self.time_selection and not call.recompute and has_work and (observe or edit)
        start = _clock(hidden.device) if timed else 0.0
        watching = self.observe_at.get(layer_idx, ()) if observe else ()
        for k in self.edits_at.get(layer_idx, ()) if edit else ():
            step = self.steps[k]
            if k in watching:  # a step observing its own layer: just before its edit
                call.observed[k] = step.observe(Context(self, call, layer_idx, hidden, call.state))
            ctx = Context(self, call, layer_idx, hidden, call.state, call.observed.pop(k, None))
            edits = step.edit(ctx)
            # a sequence of edits runs in order; a callable in it gets the context after the ones before
            for item in edits if isinstance(edits, (list, tuple)) else (edits,):
                if callable(item):
                    item = item(Context(self, call, layer_idx, hidden, call.state, ctx.observed))
                if item is None:
                    continue
                rotary = self.adapter.rotary if layer_idx > 0 else None
                before = call.state
                hidden, call.state, changed = apply_edit(item, hidden, call.state, rotary)
                if changed and isinstance(item, Merge):  # the trace tells which tokens each pooled one holds
                    real = before.valid & ~before.inserted
                    n = call.valid.shape[1]
                    call.carrier = merged_carrier(call.carrier, before.orig, real, item.leader, n)
                call.edited |= changed
                call.reduced |= changed and layer_idx > 0
        for k in watching:  # steps acting at a later layer observe what this layer really computes on
            step = self.steps[k]
            if step.layer != layer_idx:
                call.observed[k] = step.observe(Context(self, call, layer_idx, hidden, call.state))
        if timed:
            self.trace.selection_ms += (_clock(hidden.device) - start) * 1e3
        if not edit:
            return hidden
        if layer_idx in self.layout:
            s = call.state
            call.stage_states.append(s)
            call.records.append(StageRecord(layer_idx, s.orig, s.valid, s.visual, carrier=call.carrier))
        return hidden

    def _check_checkpointing(self) -> None:
        layers = [self.adapter.layers[-1]]
        if self.vision_runners:
            layers.append(self.adapter.vision_layers[max(self.vision_runners)])
        if any(compat.checkpointing_active(m) and compat.checkpoint_reruns_hooks(m) for m in layers):
            raise compat.fail(
                "activation checkpointing with a method that edits tokens or computes layers needs "
                "transformers >= 5.23: this release checkpoints each layer's __call__, so the backward pass "
                "would replay the layers without the engine's edits; upgrade transformers or train without "
                "checkpointing"
            )

    def _text_post(self, module, args, kwargs, output):
        if module is not self.adapter.text_model:
            return None
        call, self._call = self._call, None
        if call is None:
            return None
        if self._generate_vision is None:
            self._vision_store = None  # outside generate() nothing reads it again: free the tower's tensors
        if call.mode == "prefill":
            if call.recompute:
                self.trace.decode.append(
                    DecodeRecord(
                        [r.layer for r in call.records[1:]]
                        if self.input_stage
                        else [r.layer for r in call.records],
                        call.valid.sum(-1),
                        [r.valid.sum(-1) for r in (call.records[1:] if self.input_stage else call.records)],
                        cached=False,
                    )
                )
            if call.edited:
                self._final = call.state
            returned = compat.output_cache(output)
            if call.edited and returned is not None and returned is not call.cache:
                raise compat.fail(
                    "the language model returned a KV cache that its decoder layers were not seen to fill; "
                    "decoding from it would ignore the reduction"
                )
            if call.cache is not None and call.edited:
                kvmaps = [KVMap(s.orig, s.valid, s.shift) for s in call.stage_states]
                first = kvmaps[0].orig.shape[1] if self.input_stage else call.n_input
                if compat.cache_length(call.cache) == first:
                    # tokens past the prompt (draft tokens of assisted / prompt-lookup decoding that
                    # generate() sends with the prompt) are not prompt: a cache may be cropped back to it
                    record = KVRecord(
                        first,
                        call.n_input,
                        call.prompt_len,
                        self.layout,
                        kvmaps,
                        call.next_pos,
                        call.pos_rows,
                    )
                    set_kv_record(call.cache, record)
        elif call.record is not None and compat.cache_length(call.cache) == call.past_len + call.n_input:
            r = call.record
            set_kv_record(
                call.cache,
                KVRecord(
                    n_cached=call.past_len + call.n_input,
                    n_orig=r.n_orig + call.n_input,
                    n_prompt=r.n_prompt,
                    layout=r.layout,
                    kvmaps=[m.extended(call.new_orig, call.valid) for m in r.kvmaps],
                    next_pos=None if r.next_pos is None else r.next_pos + call.valid.sum(-1),
                    pos_rows=r.pos_rows,
                ),
            )
        return None

    # --- decoder layers --------------------------------------------------------------------------------
    def _layer_hook(self, layer_idx: int, module, args, kwargs):
        call = self._call
        if call is None or module is not self.adapter.layers[layer_idx]:
            return None
        if call.mode == "prefill":
            return self._prefill_layer(layer_idx, call, args, kwargs)
        return self._extend_layer(layer_idx, call, args, kwargs)

    def _prefill_layer(self, layer_idx, call: _Call, args, kwargs):
        hidden = compat.layer_hidden(args, kwargs)
        s = call.state
        if s.cos is None:  # the first hooked layer: the tables the model computed for its layer-0 sequence
            b = hidden.shape[0]
            cos, sin = compat.layer_rotary(kwargs)
            s.cos, s.sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
            call.cache = compat.find_cache(args, kwargs)
            if self.layout:
                check_cache(call.cache)
        hidden = self._run_steps(layer_idx, hidden, call, edit=layer_idx > 0)
        if not call.reduced:
            return None
        s = call.state
        key = (id(s), id(kwargs.get("attention_mask")))
        if key not in call.masks:
            call.masks[key] = prefill_mask(
                kwargs.get("attention_mask"), s, self.adapter.attn_implementation, s.cos.dtype
            )
        kwargs["attention_mask"] = call.masks[key]
        kwargs["position_embeddings"] = (s.cos, s.sin)
        kwargs["position_ids"] = layer_position_ids(kwargs.get("position_ids"), s.pos, s.base)
        return compat.set_layer_hidden(args, kwargs, hidden)

    def _extend_layer(self, layer_idx, call: _Call, args, kwargs):
        stage = self.stage_of_layer[layer_idx]
        if stage == 0 or not call.kvmaps:  # unedited layers, or a cache with no record (runners only)
            return None
        m = call.kvmaps[stage - 1]
        mask = kwargs.get("attention_mask")
        key = (stage, id(mask))
        if key not in call.masks:
            dtype = compat.layer_rotary(kwargs)[0].dtype
            impl = self.adapter.attn_implementation
            call.masks[key] = extend_mask(
                mask, call.new_orig, call.valid, m, impl, dtype, fresh=self.input_stage
            )
        kwargs["attention_mask"] = call.masks[key]
        if call.new_pos is not None or bool(m.shift.any()):
            if stage not in call.rope:
                hidden = compat.layer_hidden(args, kwargs)
                b, n = hidden.shape[:2]
                given = call.new_pos
                if given is None:
                    given = expand_positions(kwargs.get("position_ids"), b, n, hidden.device)
                pos = given - m.shift[:, None]
                call.rope[stage] = (pos, self.adapter.rotary(hidden, pos))
            pos, rope = call.rope[stage]
            if kwargs.get("position_ids") is not None:
                given = kwargs["position_ids"]
                kwargs["position_ids"] = pos if pos.dim() == given.dim() else pos[0]
            kwargs["position_embeddings"] = rope
        return args, kwargs

    def _vision_hook(self, layer_idx: int, module, args, kwargs):
        """Vision steps at a vision encoder layer's input: observe, or replace the hidden states."""
        if module is not self.adapter.vision_layers[layer_idx]:
            return None
        hidden = compat.layer_hidden(args, kwargs)
        if self._vision_store is None:
            self._vision_store = {}
        changed = False
        start = _clock(hidden.device) if self.time_selection else 0.0
        for step in self.vision_at[layer_idx]:
            vctx = VisionContext(
                self.adapter, layer_idx, hidden, self._vision_store, kwargs, self._vision_inputs
            )
            out = step.run(vctx)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
                raise LeanVLMError(
                    f"a vision step at layer {layer_idx} returned {getattr(out, 'shape', type(out).__name__)}; "
                    f"it may only return hidden states of the input's shape {tuple(hidden.shape)}"
                )
            hidden, changed = out, True
        if self.time_selection:
            self._vision_ms = (self._vision_ms or 0.0) + (_clock(hidden.device) - start) * 1e3
        return compat.set_layer_hidden(args, kwargs, hidden) if changed else None

    def _vision_run_forward(self, layer_idx: int, layer, *args, **kwargs):
        """The forward of a vision encoder layer a method's runner replaces (whenever the tower runs)."""
        stock = type(layer).forward.__get__(layer)
        if layer is not self.adapter.vision_layers[layer_idx]:
            return stock(*args, **kwargs)
        hidden = compat.layer_hidden(args, kwargs)
        if self._vision_store is None:
            self._vision_store = {}

        def call_layer(h: torch.Tensor, **changes) -> torch.Tensor:
            a, k = compat.set_layer_hidden(args, {**kwargs, **changes}, h)
            return compat.layer_output_hidden(stock(*a, **k))

        vctx = VisionContext(self.adapter, layer_idx, hidden, self._vision_store, kwargs, self._vision_inputs)
        out = self.vision_runners[layer_idx].run(vctx, layer_idx, layer, hidden, call_layer)
        return compat.layer_output(out)

    def _replaced_forward(self, layer_idx: int, layer, *args, **kwargs):
        """The forward of a layer a method's runner replaces (while a call of this model is running)."""
        stock = type(layer).forward.__get__(layer)
        call = self._call
        if call is None or layer is not self.adapter.layers[layer_idx]:
            return stock(*args, **kwargs)
        hidden = compat.layer_hidden(args, kwargs)

        def call_layer(h: torch.Tensor, **changes) -> torch.Tensor:
            a, k = compat.set_layer_hidden(args, {**kwargs, **changes}, h)
            return compat.layer_output_hidden(stock(*a, **k))

        state = call.state if call.mode == "prefill" else None
        ctx = Context(self, call, layer_idx, hidden, state)
        out = self.runners[layer_idx].run(ctx, layer_idx, layer, hidden, call_layer)
        return compat.layer_output(out)
