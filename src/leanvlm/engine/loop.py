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
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import LeanVLMError, UnsupportedModelError
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
from .trace import ScoreRecord, StageRecord, Trace

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
    prompt_len: int = 0
    visual_counts: list[int] = field(default_factory=list)
    state: TokenState | None = None
    reduced: bool = False
    stage_states: list[TokenState] = field(default_factory=list)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    rope: dict = field(default_factory=dict)
    cache: object | None = None
    # extend mode
    kvmaps: list[KVMap] = field(default_factory=list)
    past_len: int = 0
    n_prompt: int = 0
    new_orig: torch.Tensor | None = None


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
    if bool((needed & ~present).any()):
        b, p = (needed & ~present).nonzero()[0].tolist()
        raise LeanVLMError(
            f"sample {b}: position {p} is needed for the loss (a supervised token or the one before it) "
            "but the method removed it; supervised tokens must follow text tokens"
        )
    return kept


class Engine:
    """Installs the hooks for one in-LLM method (or none: then it only records the trace)."""

    def __init__(self, adapter, method=None):
        self.adapter = adapter
        self.method = method
        n_layers = adapter.num_layers
        self.trace = Trace(num_layers=n_layers)
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
        self.prompt_len: int | None = None
        self._visual: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._vision_inputs: dict | None = None
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None
        self._call: _Call | None = None
        self._handles: list = []
        self._patched_generate = False

    # --- install / remove ---------------------------------------------------------------------------
    def install(self) -> None:
        a = self.adapter
        self._handles.append(a.vlm_model.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
        if self.stages:
            self._handles.append(a.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
            self._handles.append(a.model.register_forward_hook(self._top_post, with_kwargs=True))
        self._handles.append(a.text_model.register_forward_pre_hook(self._text_pre, with_kwargs=True))
        self._handles.append(a.text_model.register_forward_hook(self._text_post, with_kwargs=True))
        if self.stages:
            first = min([*self.score_at, self.stages[0].layer])
            for i in range(first, a.num_layers):
                hook = self._make_layer_hook(i)
                self._handles.append(a.layers[i].register_forward_pre_hook(hook, with_kwargs=True))
            self._patch_generate()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._patched_generate:
            del self.adapter.model.generate
            self._patched_generate = False
        self._call = None
        self._visual = None

    def _patch_generate(self) -> None:
        # generate() without a KV cache re-runs the whole sequence each step; ranking must keep using
        # the last *prompt* token so that cached and uncached generation keep the same tokens.
        model = self.adapter.model
        engine = self
        cls_generate = type(model).generate

        def generate(self_model, *args, **kwargs):
            inputs = kwargs.get("inputs", kwargs.get("input_ids", args[0] if args else None))
            if inputs is None:
                inputs = kwargs.get("inputs_embeds")
            engine.prompt_len = inputs.shape[1] if inputs is not None else None
            try:
                return cls_generate(self_model, *args, **kwargs)
            finally:
                engine.prompt_len = None

        model.generate = types.MethodType(generate, model)
        self._patched_generate = True

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
        past = kwargs.get("past_key_values")
        fresh = embeds is not None and embeds.shape[1] > 1 and (past is None or past.get_seq_length() == 0)
        if input_ids is None and self.stages and fresh and not bool(self._visual.any()):
            warnings.warn(
                "leanvlm found no visual-token placeholders in inputs_embeds, so nothing is dropped; "
                "pass input_ids (with pixel_values) to let the method locate the visual tokens",
                stacklevel=2,
            )

    def _top_pre(self, module, args, kwargs):
        # The model's logits will cover only the kept tokens: take the labels, and compute the loss
        # against the labels of those tokens once the forward is done (_top_post).
        self._labels = kwargs.pop("labels", None)
        return None if self._labels is None else (args, kwargs)

    def _top_post(self, module, args, kwargs, output):
        labels, self._labels = self._labels, None
        if labels is None:
            return None
        if not hasattr(output, "logits"):
            raise UnsupportedModelError("labels with a token-reducing method need return_dict=True outputs")
        if self._final is not None:
            labels = align_labels(labels, *self._final)
        loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if kwargs.get(k) is not None}
        output.loss = module.loss_function(
            logits=output.logits, labels=labels, vocab_size=output.logits.shape[-1], **loss_kwargs
        )
        return output

    def _text_pre(self, module, args, kwargs):
        self._call = None
        self._final = None
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        b, n = ref.shape[:2]
        device = ref.device
        past = kwargs.get("past_key_values")
        past_len = past.get_seq_length() if past is not None else 0
        mask2d = kwargs.get("attention_mask")
        if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2:
            valid = mask2d[:, -n:].bool()
        else:
            valid = torch.ones(b, n, dtype=torch.bool, device=device)
        visual = self._visual
        self._visual = None
        if visual is None or visual.shape != (b, n):
            visual = torch.zeros(b, n, dtype=torch.bool, device=device)
        visual = visual.to(device) & valid

        if past_len == 0:
            if past is not None:
                set_kv_record(past, None)  # a reset or new cache: nothing from an earlier prefill applies
            self.trace.reset()
            self.trace.vision_inputs = self._vision_inputs
            orig = torch.arange(n, device=device).expand(b, n)
            self.trace.stages.append(StageRecord(0, orig, valid, visual))
            if self.stages and bool(visual.any()):
                prompt_len = min(self.prompt_len or n, n)
                self._call = _Call(
                    mode="prefill",
                    n_input=n,
                    valid=valid,
                    visual=visual,
                    prompt_len=prompt_len,
                    visual_counts=visual.sum(-1).tolist(),
                    position_ids=self._stack_positions(kwargs.get("position_ids")),
                    query_rows=self._answer_queries(b, n, device),
                )
            return None

        entry = get_kv_record(past)
        if entry is None:
            lengths = {layer.get_seq_length() for layer in getattr(past, "layers", [])}
            if len(lengths) > 1:
                raise LeanVLMError(
                    f"this KV cache has layers of different lengths {sorted(lengths)} but no record of the "
                    "reduction that filled it; continue it with the model and method that filled it"
                )
            return None
        n_cached, n_prompt, layout, kvmaps = entry
        if layout != self.layout:
            raise LeanVLMError(
                f"this KV cache was filled with reductions at layers {list(layout)} but the applied method "
                f"reduces at layers {list(self.layout)}; continue a cache with the method that filled it"
            )
        if past_len != n_cached:
            kvmaps = self._crop_maps(kvmaps, n_cached, n_prompt, past_len)
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
        return None

    @staticmethod
    def _stack_positions(position_ids):
        # Qwen-VL may prepend a text-position row to its three M-RoPE rows
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[1:]
        return position_ids

    def _answer_queries(self, b: int, n: int, device) -> torch.Tensor | None:
        """Training: the token just before each answer span ranks the visual tokens (PyramidDrop's rule)."""
        labels = self._labels
        if labels is None or labels.shape != (b, n):
            return None
        supervised = labels.to(device) != IGNORE_INDEX
        before = torch.zeros_like(supervised)
        before[:, :-1] = ~supervised[:, :-1] & supervised[:, 1:]
        return before

    def _text_post(self, module, args, kwargs, output):
        call, self._call = self._call, None
        if call is None:
            return None
        if call.mode == "prefill":
            if call.reduced:
                self._final = (call.state.orig, call.state.valid)
            if call.cache is not None and call.reduced:
                kvmaps = [KVMap(s.orig, s.valid, s.shift) for s in call.stage_states]
                if call.cache.get_seq_length() == call.n_input:
                    set_kv_record(call.cache, (call.n_input, call.n_input, self.layout, kvmaps))
        elif call.cache.get_seq_length() == call.past_len + call.n_input:
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
    def _make_layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            if call.mode == "prefill":
                return self._prefill_layer(layer_idx, call, args, kwargs)
            return self._extend_layer(layer_idx, call, args, kwargs)

        return hook

    @staticmethod
    def _set_hidden(args, kwargs, hidden):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _prefill_layer(self, layer_idx, call: _Call, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if call.state is None:
            b, n = hidden.shape[:2]
            cos, sin = kwargs["position_embeddings"]
            call.cache = kwargs.get("past_key_values")
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
            self.trace.stages.append(StageRecord(layer_idx, s.orig, s.valid, s.visual))
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
        return self._set_hidden(args, kwargs, hidden)

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
            weight = torch.ones_like(query_slots, dtype=torch.bool)
        else:
            query_slots, weight = compact_indices(in_prompt & ~s.visual)  # [B, Q]
        if query_slots.shape[1] == 0:  # no sample has a query row (e.g. every token supervised): no ranking
            return torch.zeros(s.orig.shape, device=hidden.device)
        with torch.no_grad():
            q, k, scaling = self.adapter.query_key(layer_idx, hidden.detach(), s.cos, s.sin, query_slots)
            visible = build_bool_mask(s.orig.gather(1, query_slots), s.orig, s.valid)[:, 0]  # [B, Q, n]
            probs = attention_to_keys(q, k, visible, scaling)
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

        Each run of consecutive visual slots is one image; "1d" groups ``stride`` consecutive tokens of
        a run, "2d" groups square blocks of the image's grid (the adapter's fixed grid)."""
        b, n = s.orig.shape
        leader = torch.arange(n, device=s.orig.device).expand(b, n).clone()
        visual = (s.visual & s.valid).tolist()
        grid = self.adapter.fixed_grid if stage.pool == "2d" else None
        side = int(round(stage.stride**0.5))
        for bi in range(b):
            j = 0
            while j < n:
                if not visual[bi][j]:
                    j += 1
                    continue
                start = j
                while j < n and visual[bi][j]:
                    j += 1
                length = j - start
                if grid is None:
                    offsets = torch.arange(length) // stage.stride * stage.stride
                else:
                    rows, cols = grid
                    if rows * cols != length:
                        raise LeanVLMError(
                            f"2-D pooling: an image run of {length} visual tokens does not match its {rows}x{cols} grid"
                        )
                    r, c = torch.arange(length) // cols, torch.arange(length) % cols
                    offsets = (r // side * side) * cols + (c // side * side)
                leader[bi, start:j] = start + offsets.to(leader.device)
        return leader

    def _prefill_mask(self, mask, s: TokenState, call: _Call):
        key = (id(s), id(mask))
        if key not in call.masks:
            if mask is None:
                if bool(s.valid.all()):
                    out = None  # causal over the kept tokens, in order: the kernel's is_causal is right
                else:
                    out = self._fresh_mask(build_bool_mask(s.orig, s.orig, s.valid), s.cos.dtype)
            elif mask.dim() == 2:
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
            if mask is None:
                if call.n_input == 1 and bool(k_valid.all()):
                    out = None
                else:
                    cos = kwargs["position_embeddings"][0]
                    out = self._fresh_mask(build_bool_mask(call.new_orig, k_orig, k_valid), cos.dtype)
            else:
                out = mask_keys(gather_mask(mask, None, k_orig), k_valid)
            call.masks[key] = out
        kwargs["attention_mask"] = call.masks[key]
        if self.positions == "compact":
            if stage not in call.rope:
                hidden = args[0] if args else kwargs["hidden_states"]
                b, n = hidden.shape[:2]
                pos = expand_positions(kwargs.get("position_ids"), b, n, hidden.device) - m.shift[:, None]
                call.rope[stage] = (pos, self.adapter.rotary(hidden, pos))
            pos, rope = call.rope[stage]
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = pos
            kwargs["position_embeddings"] = rope
        return args, kwargs
