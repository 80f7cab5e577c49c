"""What each decoder layer really processed in the last prefill. FLOPs and reports read this."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class StageRecord:
    """The token set from ``layer`` on: per sample, original indices of the real tokens and which are visual."""

    layer: int
    orig: torch.Tensor  # [B, n] original index of each slot
    valid: torch.Tensor  # [B, n] real token (not padding)
    visual: torch.Tensor  # [B, n] visual token (and valid)
    #: [B, N] for each input token, the original index of the token whose slot carries it from this stage
    #: on: itself, or the leader of the group a :class:`~leanvlm.engine.edits.Merge` pooled it into
    #: (through every merge so far); None when nothing was merged. Whether that slot is still there is
    #: told by ``orig``.
    carrier: torch.Tensor | None = None

    def pooled_groups(self, sample: int = 0) -> dict[int, list[int]]:
        """The pooled tokens of ``sample`` present from this stage on: {original index of the slot (the
        group's leader): original indices of every input token averaged into it, leader included}."""
        if self.carrier is None:
            return {}
        carrier = self.carrier[sample]
        present = set(self.orig[sample][self.visual[sample]].tolist())
        groups: dict[int, list[int]] = {}
        for token, lead in enumerate(carrier.tolist()):
            if lead in present:
                groups.setdefault(lead, []).append(token)
        return {lead: members for lead, members in groups.items() if len(members) > 1}


def merged_carrier(
    carrier: torch.Tensor | None, orig: torch.Tensor, real: torch.Tensor, leader: torch.Tensor, n: int
) -> torch.Tensor:
    """:attr:`StageRecord.carrier` [B, n] after a merge: ``leader`` [B, m] the Merge's leader slot of each
    slot, ``orig`` [B, m] the slots' original indices and ``real`` [B, m] the slots that are input tokens
    (not padding, fillers or inserted tokens) before it; ``carrier`` the map before it (None: identity)."""
    b = orig.shape[0]
    step = torch.arange(n + 1, device=orig.device).expand(b, n + 1).clone()
    # each real slot's token now rides on its leader's; the rest write to a spare column
    step.scatter_(1, torch.where(real, orig, n), torch.where(real, orig.gather(1, leader), n))
    step = step[:, :n]
    return step if carrier is None else step.gather(1, carrier.to(step.device))


@dataclass
class ScoreRecord:
    """One ranking computation: at ``layer``, per sample, keys over ``tokens`` and ``queries`` query rows."""

    layer: int
    tokens: torch.Tensor  # [B]
    queries: torch.Tensor  # [B]


@dataclass
class DecodeRecord:
    """One forward after the prefill: a decode step (or a chunk of tokens appended to the cache).

    ``layers``: the first layer of each stage (0 first); ``new_tokens`` [B]: real tokens this step
    processed; ``keys`` per stage [B]: the real entries each layer of that stage attended to (its cache
    plus the new tokens). ``cached`` is False for generate() without a KV cache, which recomputes the
    whole sequence: then ``new_tokens`` is the whole sequence and ``keys`` what each stage processed.
    """

    layers: list[int]
    new_tokens: torch.Tensor
    keys: list[torch.Tensor]
    cached: bool = True

    def kv_per_layer(self, num_layers: int) -> list[list[int]]:
        """Per sample: the entries each decoder layer attended to in this step."""
        starts = [*self.layers, num_layers]
        per_stage = torch.stack([k.to(self.keys[0].device) for k in self.keys], dim=1).tolist()
        return [
            [row[s] for s in range(len(self.layers)) for _ in range(starts[s + 1] - starts[s])]
            for row in per_stage
        ]


@dataclass
class Trace:
    """What the model processed in the last prefill (``stages``, ``tokens_per_layer``, ...) and in every
    forward after it (``decode``, one :class:`DecodeRecord` per step), until the next prefill.

    After ``generate()``, the per-layer properties describe the prefill (what was pruned where) and
    ``decode`` the decode steps; a new prefill (a fresh forward or generate call) starts over."""

    num_layers: int
    stages: list[StageRecord] = field(default_factory=list)
    scoring: list[ScoreRecord] = field(default_factory=list)
    #: the FLOPs a method's own selection computed per sample outside the layers (e.g. DivPrune's
    #: distance matrix), as (what, [B] FLOPs)
    selection: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    #: wall time (ms) of the methods' own work in the last prefill (vision steps, and every step's
    #: observe / edit: rankings, selection, merges), measured only while the engine's ``time_selection``
    #: is on
    selection_ms: float = 0.0
    #: () -> [B, N] which image each input token belongs to (-1 elsewhere), computed when asked
    image_ids_of: Callable | None = None
    #: the decode steps since the last prefill
    decode: list[DecodeRecord] = field(default_factory=list)
    #: the vision-related inputs of the last prefill (image sizes / grids), for vision FLOPs
    vision_inputs: dict | None = None
    #: layers a method's runner computed in a split form, by layer: (tokens that gave only keys and
    #: values [B], tokens the layer processed beyond the sequence's own [B], FLOPs of the method's own
    #: modules in the layer [B]) (ProxyV: full vision tokens, proxies, the guided update)
    layer_work: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: vision encoder layers a runner computed, by layer: (tokens per sequence in attention, in the MLP)
    #: (CrossGET's tower shrinks layer by layer); layers not listed ran in full
    tower_tokens: dict[int, tuple[int, int]] = field(default_factory=dict)
    prefills: int = 0

    def __repr__(self) -> str:
        layers = [s.layer for s in self.stages]
        return (
            f"Trace(num_layers={self.num_layers}, batch={self.batch_size}, stages_at_layers={layers}, "
            f"decode_steps={self.decode_steps})"
        )

    def reset(self) -> None:
        self.stages = []
        self.scoring = []
        self.selection = []
        self.selection_ms = 0.0
        self.image_ids_of = None
        self.decode = []
        self.vision_inputs = None
        self.layer_work = {}
        self.tower_tokens = {}
        self.prefills += 1

    @property
    def decode_steps(self) -> int:
        """Forwards run after the prefill (decode steps of generate(), or cache extensions)."""
        return len(self.decode)

    @property
    def decode_tokens(self) -> list[int]:
        """Per sample: real tokens processed by the cached decode steps since the prefill."""
        steps = [r.new_tokens for r in self.decode if r.cached]
        if not steps:
            return [0] * self.batch_size
        return torch.stack([t.to(steps[0].device) for t in steps]).sum(0).tolist()

    def _per_layer(self, counts: list[torch.Tensor]) -> list[list[int]]:
        if not self.stages:
            return []
        starts = [s.layer for s in self.stages] + [self.num_layers]
        per_stage = torch.stack(counts, dim=1).tolist()  # [B, S]
        return [
            [row[s] for s in range(len(self.stages)) for _ in range(starts[s + 1] - starts[s])]
            for row in per_stage
        ]

    @property
    def tokens_per_layer(self) -> list[list[int]]:
        """Per sample: the number of (non-padding) tokens each decoder layer processed."""
        return self._per_layer([s.valid.sum(-1) for s in self.stages])

    @property
    def visual_per_layer(self) -> list[list[int]]:
        """Per sample: the number of visual tokens each decoder layer processed."""
        return self._per_layer([s.visual.sum(-1) for s in self.stages])

    @property
    def kept_visual(self) -> list[list[torch.Tensor]]:
        """Per stage, per sample: original sequence indices of the visual tokens present from that stage on."""
        return [[s.orig[b][s.visual[b]] for b in range(s.orig.shape[0])] for s in self.stages]

    def visual_per_image(self, sample: int = 0) -> list[tuple[int, int]]:
        """Per image of ``sample`` (a Qwen-VL video frame counts as one), in order: (visual tokens the
        model made, visual tokens that reached the LLM's first layer, after any reduction before it)."""
        if not self.stages or self.image_ids_of is None:
            return []
        ids = self.image_ids_of()[sample]
        entered = [s for s in self.stages if s.layer == 0][-1]  # after the input stage's edits
        reached = ids[entered.orig[sample][entered.visual[sample]]]
        images = sorted(int(i) for i in ids.unique() if i >= 0)
        return [(int((ids == i).sum()), int((reached == i).sum())) for i in images]

    def scoring_counts(self, sample: int) -> list[tuple[int, int]]:
        """(tokens, query rows) of every ranking computation of ``sample``, for FLOPs accounting."""
        return [(int(r.tokens[sample]), int(r.queries[sample])) for r in self.scoring]

    def layer_work_counts(self, sample: int) -> list[tuple[int, int, int]] | None:
        """Per decoder layer of ``sample``: (key/value-only tokens, extra tokens, module FLOPs) of the
        layers a runner computed in a split form ((0, 0, 0) elsewhere); None when no layer was."""
        if not self.layer_work:
            return None
        out = [(0, 0, 0)] * self.num_layers
        for layer, values in self.layer_work.items():
            out[layer] = tuple(int(v[sample]) for v in values)
        return out

    def selection_flops(self, sample: int) -> int:
        """FLOPs of the methods' own selection work for ``sample`` (outside the decoder layers)."""
        return int(sum(int(flops[sample]) for _, flops in self.selection))

    @property
    def batch_size(self) -> int:
        return self.stages[0].orig.shape[0] if self.stages else 0
