"""What a method sees at a step: the hidden states, the token state, and lazily computed facts about
the call (which slot ends the prompt, which image a visual slot belongs to, attention from query rows)."""

from __future__ import annotations

import torch

from ..ops import attention_to_keys, build_bool_mask, compact_indices, mean_query_scores
from .state import INSERTED, TokenState
from .trace import ScoreRecord


class Context:
    """One step's view. ``hidden`` [B, n, D] and ``state`` are the input of decoder layer ``layer``
    (layer 0 at the input stage: the embeddings, image features merged in). ``observed`` is what the
    step's ``observe`` returned at an earlier layer (None without one)."""

    def __init__(self, engine, call, layer: int, hidden: torch.Tensor, state: TokenState, observed=None):
        self._engine, self._call = engine, call
        self.adapter = engine.adapter
        self.layer = layer
        self.hidden = hidden
        self.state = state
        self.observed = observed

    @property
    def decoding(self) -> bool:
        """A forward that extends a cache (``state`` is None: the new tokens are all the layer sees)."""
        return self.state is None

    def to_tokens(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[B, n] per-slot values -> [B, N] per input token (inserted slots left out), so that a value
        observed at one layer can be read at a later one whose slots differ (:meth:`from_tokens`)."""
        s = self.state
        n = self._call.n_input
        out = torch.full((s.orig.shape[0], n + 1), fill, dtype=values.dtype, device=values.device)
        index = torch.where(s.valid & (s.kind != INSERTED), s.orig, n)  # the rest lands in a spare column
        return out.scatter_(1, index, values)[:, :n]

    def from_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """[B, N] per input token -> [B, n] per slot of this step."""
        return values.gather(1, self.state.orig)

    @property
    def replicas(self) -> int:
        """How many consecutive samples of this batch are copies of one sample whose images the vision
        tower ran once (generate() with beams or several returned sequences, transformers >= 5.23):
        sample ``b`` is a copy of original sample ``b // replicas``. 1 otherwise."""
        return self._call.replicas

    @property
    def tower_inputs(self) -> dict:
        """The image layout the vision tower ran on: :attr:`vision_inputs`' layout, or the original
        samples' when generate() repeated them after the tower ran (see :attr:`replicas`)."""
        return self._call.tower_inputs or {}

    @property
    def vision_inputs(self) -> dict:
        """The call's image-layout inputs (``image_sizes``, ``image_grid_thw``, ``video_grid_thw``, where
        given) and its ``input_ids``."""
        return self._call.vision_inputs or {}

    @property
    def shared(self) -> dict:
        """A dict shared by the call's steps (observe and edit), fresh for every call: what one step
        works out for later ones (e.g. SparseVLM's text raters)."""
        return self._call.shared

    @property
    def vision(self) -> dict:
        """What this call's vision steps stored (``VisionContext.store``); empty without images."""
        return self._call.vision

    # --- facts about the call --------------------------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        """Tokens of the call that are prompt (original coordinates); later ones are drafts or answers."""
        return self._call.prompt_len

    @property
    def visual_counts(self) -> list[int]:
        """Per sample: visual tokens that entered the LLM (the input's, less what input-stage edits
        removed): what a budget such as ``keep_ratio`` is a share of."""
        return self._call.visual_counts

    @property
    def training(self) -> bool:
        """The call has labels: query rows are the tokens before the answer spans."""
        return self._call.query_rows is not None

    @property
    def has_query(self) -> torch.Tensor:
        """[B] whether a sample has a query row (always in inference; in training: an answer span)."""
        if self._call.query_rows is None:
            return torch.ones(self.state.orig.shape[0], dtype=torch.bool, device=self.state.orig.device)
        return self._call.query_rows.any(-1)

    @property
    def in_prompt(self) -> torch.Tensor:
        """[B, n] real slots of the prompt's tokens (inserted slots are not prompt)."""
        s = self.state
        return s.valid & (s.orig < self._call.prompt_len) & (s.kind != INSERTED)

    def instruction(self) -> torch.Tensor:
        """[B, n] each sample's instruction: its prompt's text tokens after its last visual token (the
        question and the chat template), or all of its prompt's text when none follows an image."""
        s = self.state
        text = self.in_prompt & ~s.visual
        last_visual = torch.where(s.visual, s.slots, -1).max(-1, keepdim=True).values
        after = text & (s.slots > last_visual)
        return torch.where(after.any(-1, keepdim=True), after, text)

    def last_prompt_slot(self) -> torch.Tensor:
        """[B, 1] the slot of the last prompt token (-1 for a row of padding only): what generation
        continues from."""
        return torch.where(self.in_prompt, self.state.slots, -1).max(-1, keepdim=True).values

    def image_ids(self) -> torch.Tensor:
        """[B, n] which image (per sample, from 0) each visual slot belongs to; -1 elsewhere. Two images
        back to back are two images (the adapter counts each image's tokens)."""
        call = self._call
        if call.image_ids is None:
            ids = self.adapter.image_ids(call.placeholders, call.vision_inputs)
            call.image_ids = ids.masked_fill(~call.valid, -1)
        s = self.state
        return call.image_ids.gather(1, s.orig).masked_fill(~s.visual, -1)

    def add_cost(self, what: str, flops) -> None:
        """Record the FLOPs [B] (per sample) of selection work the method did outside the layers, so that
        reports count it (not in recomputations of uncached generation)."""
        if not self._call.recompute:
            self._engine.trace.selection.append((what, torch.as_tensor(flops)))

    def record_layer_work(self, kv_only, extra, module_flops) -> None:
        """A runner that computed this layer in a split form records, per sample [B]: the tokens that
        only gave keys and values, the tokens processed beyond the sequence's own, and the FLOPs of the
        method's own modules here (what FLOPs reports count for the layer)."""
        if not self._call.recompute:
            values = tuple(torch.as_tensor(v).cpu() for v in (kv_only, extra, module_flops))
            self._engine.trace.layer_work[self.layer] = values

    def add_loss(self, value: torch.Tensor) -> None:
        """Add ``value`` (a scalar with gradient) to the loss the model returns for this call (training
        with labels; e.g. CrossGET's cross-token distillation)."""
        self._engine._losses.append(value)

    @property
    def cache(self):
        """The KV cache this call fills (None without one)."""
        return self._call.cache

    def image_slots(self) -> list[dict[int, list[int]]]:
        """Per sample: each image's visual slots, in order ({image: [slot, ...]}; see :meth:`image_ids`)."""
        out = []
        for row in self.image_ids().tolist():
            slots: dict[int, list[int]] = {}
            for j, img in enumerate(row):
                if img >= 0:
                    slots.setdefault(img, []).append(j)
            out.append(slots)
        return out

    # --- attention from query rows --------------------------------------------------------------------
    def query_slots(self, query: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [B, Q], weight [B, Q]) of the query rows: the last prompt token ("last"), the prompt's
        text tokens ("text"), or in training the token before each answer span (either setting)."""
        s = self.state
        if self._call.query_rows is not None:
            return compact_indices(self._call.query_rows.gather(1, s.orig) & s.valid & (s.kind != INSERTED))
        if query == "last":
            last = self.last_prompt_slot()
            return last.clamp_min(0), last >= 0  # a row of padding only has no query
        return compact_indices(self.in_prompt & ~s.visual & (s.kind != INSERTED))

    def attention(self, query: str = "last") -> torch.Tensor:
        """[B, n] the attention each slot receives from the query rows at this layer, recomputed from the
        layer's own norm, q/k projections and RoPE (any attention kernel), averaged over heads and rows."""
        return self.attention_from(*self.query_slots(query))

    def attention_from(self, slots: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[B, n] as :meth:`attention`, from the query rows ``slots`` [B, Q] (``weight`` [B, Q] False: a
        filler row that does not count): softmax over every key each row sees (causal)."""
        s = self.state
        if slots.shape[1] == 0:  # no sample has a query row: no ranking
            return torch.zeros(s.orig.shape, device=self.hidden.device)
        if s.cos is None:
            raise ValueError("attention scores need a decoder layer's input (not the input stage)")
        with torch.no_grad():
            q, k, scaling = self.adapter.query_key(self.layer, self.hidden.detach(), s.cos, s.sin, slots)
            visible = build_bool_mask(s.order.gather(1, slots), s.order, s.valid)[:, 0]  # [B, Q, n]
            probs = attention_to_keys(q, k, visible, scaling)
        if not self._call.recompute:
            self._engine.trace.scoring.append(ScoreRecord(self.layer, s.valid.sum(-1), weight.sum(-1)))
        return mean_query_scores(probs, weight)


#: where vision runners' per-layer token counts live in the vision store (read into the trace)
TOWER_TOKENS = "tower_tokens"


class VisionContext:
    """A vision step's view: ``hidden``, the input of vision encoder layer ``layer`` (CLIP-style towers:
    [sequences, tokens, D], one sequence per image or crop; Qwen-VL: [patches, D], every image's patches
    concatenated), and ``store``, a dict shared by the call's steps (read later as ``ctx.vision``).
    ``kwargs``: the other keyword arguments the layer is called with (Qwen-VL: ``cu_seqlens``, the
    rotary ``position_embeddings``); ``vision_inputs``: the call's image layout (``image_grid_thw``,
    ``video_grid_thw``, ``image_sizes`` where given)."""

    def __init__(
        self, adapter, layer: int, hidden: torch.Tensor, store: dict, kwargs=None, vision_inputs=None
    ):
        self.adapter = adapter
        self.layer = layer
        self.hidden = hidden
        self.store = store
        self.kwargs = kwargs or {}
        self.vision_inputs = vision_inputs or {}

    def record_tokens(self, attention: int, mlp: int | None = None) -> None:
        """A runner records the tokens per sequence its layer really processed (attention, then MLP when
        a merge between them shortened the sequence), for the tower's FLOPs."""
        self.store.setdefault(TOWER_TOKENS, {})[self.layer] = (attention, attention if mlp is None else mlp)
