"""Test-only methods written the way a new method is written: a file of their own, nothing changed in
``leanvlm.engine``. Each kind the engine hosts: tokens inserted at a layer, an edit of the image features
before the LLM, a range of layers replaced by a runner, an edit inside the vision tower. They run through
the invariant matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from leanvlm.engine import Insert, Keep, Replace, Step, Vision
from leanvlm.engine.state import VISUAL
from leanvlm.errors import ConfigError
from leanvlm.methods.base import Method, check_layer


@dataclass(frozen=True)
class InsertSummary(Method):
    """At ``layer``, insert ``count`` summary tokens just before each sample's first visual token: the
    j-th is (j + 1) / count times the mean hidden state of the sample's visual tokens."""

    layer: int = 2
    count: int = 2
    changes_length = True

    def check_model(self, num_layers: int) -> None:
        check_layer("InsertSummary", "layer", self.layer, num_layers)

    @property
    def is_noop(self) -> bool:
        return self.count == 0

    def plan(self, adapter):
        def insert(ctx):
            s, h = ctx.state, ctx.hidden
            vis = s.visual
            b = vis.shape[0]
            mean = (h * vis[..., None]).sum(1) / vis.sum(-1).clamp_min(1)[:, None].to(h.dtype)
            scale = torch.arange(1, self.count + 1, dtype=h.dtype) / self.count
            first = torch.where(vis, s.slots, s.slots.shape[1]).min(-1).values  # [B]
            after = (first - 1).clamp(-1, s.slots.shape[1] - 1)[:, None].expand(b, self.count)
            valid = vis.any(-1)[:, None].expand(b, self.count)
            return Insert(mean[:, None] * scale[None, :, None], after.contiguous(), valid.contiguous())

        return [Step(self.layer, insert)]

    def visual_schedule(self, num_layers, images):
        return [sum(images)] * num_layers

    def extra_tokens(self, num_layers, images):
        return [0] * self.layer + [self.count if sum(images) else 0] * (num_layers - self.layer)


@dataclass(frozen=True)
class EveryOtherFeature(Method):
    """Before the LLM (the image features merged into the embeddings), keep every ``step``-th visual
    token of each sample; the prompt is assumed not to end with an image."""

    step: int = 2
    positions: str = "original"
    stage = "input"

    def __post_init__(self):
        if self.positions not in ("original", "compact"):
            raise ConfigError(f"EveryOtherFeature: positions={self.positions!r}")

    def check_model(self, num_layers: int) -> None:
        pass

    @property
    def is_noop(self) -> bool:
        return self.step == 1

    def plan(self, adapter):
        def keep(ctx):
            s = ctx.state
            vis = s.visual & (s.kind == VISUAL)
            rank = vis.long().cumsum(-1) - 1
            return Keep(~vis | (rank % self.step == 0), compact=self.positions == "compact")

        return [Step(0, keep)]

    def visual_schedule(self, num_layers, images):
        return [-(-sum(images) // self.step)] * num_layers


@dataclass(frozen=True)
class FrozenVisual(Method):
    """Layers ``start .. end-1`` update only the text: visual tokens are keys and values but not queries
    (their hidden states pass through unchanged), a split-attention runner of the ProxyV kind."""

    start: int = 2
    end: int = 4
    changes_length = False

    def check_model(self, num_layers: int) -> None:
        if not 1 <= self.start <= self.end <= num_layers:
            raise ConfigError(f"FrozenVisual: 1 <= start <= end <= {num_layers}")

    @property
    def is_noop(self) -> bool:
        return self.start == self.end

    def plan(self, adapter):
        def run(ctx, layer_idx, layer, hidden, call_layer):
            out = call_layer(hidden)
            if ctx.decoding:
                return out  # new tokens are text
            return torch.where(ctx.state.visual[..., None], hidden, out)

        return [Replace(self.start, self.end, run)]


@dataclass(frozen=True)
class DampenVision(Method):
    """Inside the vision tower: scale the input of encoder layer ``layer`` by ``factor``, and store the
    mean norm it saw (``ctx.vision["norm"]`` for later steps)."""

    layer: int = 0
    factor: float = 0.5
    stage = "vision"
    needs = ("vision",)
    changes_length = False

    @property
    def is_noop(self) -> bool:
        return self.factor == 1.0

    def plan(self, adapter):
        def dampen(v):
            v.store["norm"] = float(v.hidden.norm(dim=-1).mean())
            return v.hidden * self.factor

        return [Vision(self.layer, dampen)]


@dataclass(frozen=True)
class CountingDecoder(Method):
    """A decoding-stage method: runs transformers' own loop (through the generate() entry) with a logits
    processor that counts the steps; ``steps`` (a class-level list) gets one count per generate call."""

    enabled: bool = True
    stage = "decode"
    changes_length = False
    steps: ClassVar[list] = []

    @property
    def is_noop(self) -> bool:
        return not self.enabled

    def decode(self, model, input_ids, stock, logits_processor=None, **kwargs):
        from transformers import LogitsProcessor, LogitsProcessorList

        count = [0]

        class Count(LogitsProcessor):
            def __call__(self, ids, scores):
                count[0] += 1
                return scores

        processors = LogitsProcessorList([*(logits_processor or []), Count()])
        try:
            return stock(input_ids, logits_processor=processors, **kwargs)
        finally:
            CountingDecoder.steps.append(count[0])
