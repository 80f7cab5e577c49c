from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.edits import Keep
from ..engine.plan import Step
from ..errors import ConfigError, check_range, is_int, show
from ..ops.diversity import max_min_select
from ..registry import register_method
from .base import POSITIONS, Method

#: distances are compared at this resolution: float noise below it (a vision tower run on a batch and on
#: one image differs by about 1e-8) does not change the selection (the reference's fp16 distances are
#: coarser still, about 2.4e-4)
RESOLUTION = 1e-5


@register_method("divprune")
@dataclass(frozen=True)
class DivPrune(Method):
    """DivPrune: before the LLM, keep a diverse subset of each image's visual tokens (greedy max-min
    selection on the projected image features by cosine distance); training-free and text-agnostic.

    Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
    CVPR 2025, arXiv 2503.02175). Reference code: https://github.com/vbdi/divprune

    Per image, of its N visual tokens, ``round(N * keep_ratio)`` (or ``keep_tokens``) are kept: first the
    most isolated token (largest cosine distance to its nearest neighbour), then repeatedly the token
    farthest (by its minimum distance) from those selected. The kept tokens keep their original order;
    text is untouched.

    Args:
        keep_ratio: share of each image's visual tokens kept, in (0, 1]. Default 0.098 (the reference's
            default: 56 of LLaVA-1.5's 576). No-op: 1.0.
        keep_tokens: keep this many visual tokens per image instead (>= 0).
        positions: "auto" (the reference: "compact", the shortened sequence numbered 0..n-1; "original"
            on M-RoPE models, whose (t, h, w) ids are kept, as the MMTok port), "original", "compact".

    Differences from the reference:
        - Features are the projected image features in the LLM's input space (as the reference), per
          image of every sample (the reference: batch row 0, one image, a hard-coded 35-token system
          prompt). LLaVA-NeXT: an image's whole packed sequence, newline tokens included (as the
          reference). Qwen-VL: the merger's outputs (the MMTok port uses pre-merger ViT features
          averaged per 2x2 group; ours stays in one feature space for every model).
        - Distances in float32, compared at a resolution of 1e-5 so that float noise does not decide
          (the reference computes in the embedding dtype, fp16 in its evaluation, where distances are
          coarser, about 2.4e-4); ties go to the earliest token, as the reference's argmax. A selected
          token is excluded explicitly (the reference relies on its self-distance being about 0, which
          can select a duplicate twice).
        - The last prompt token is never dropped (it is kept on top of the budget when it is visual).

    Its own cost (per image the Gram matrix, 2*N*N*D FLOPs, the norms and the greedy steps) is counted as
    "selection" in the reports built from the trace. The vision tower still runs in full.
    """

    keep_ratio: float = 0.098
    keep_tokens: int | None = None
    positions: str = "auto"

    stage = "input"
    needs = ("image_ids",)
    reference_positions = "compact"

    def __post_init__(self):
        check_range("DivPrune", "keep_ratio", self.keep_ratio, 0, 1, low_open=True)
        if self.keep_tokens is not None and (not is_int(self.keep_tokens) or self.keep_tokens < 0):
            raise ConfigError(f"DivPrune: keep_tokens={show(self.keep_tokens)} must be an int >= 0 (or None)")
        self._check_choice("positions", self.positions, POSITIONS)

    @property
    def is_noop(self) -> bool:
        return self.keep_tokens is None and self.keep_ratio == 1.0

    def keep_count(self, n_image: int) -> int:
        """Visual tokens kept of an image with ``n_image`` (Python's round: half to even, as the reference)."""
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n_image)
        return min(int(round(self.keep_ratio * n_image)), n_image)

    def plan(self, adapter) -> list[Step]:
        compact = self.resolved_positions(adapter.supports_compact_positions) == "compact"

        def select(ctx):
            s, hidden = ctx.state, ctx.hidden
            images = ctx.image_slots()
            keep = ~s.visual
            cost = torch.zeros(len(images), dtype=torch.long)
            for b, slots in enumerate(images):
                for idx in slots.values():
                    index = torch.tensor(idx, device=hidden.device)
                    features = hidden[b, index].detach().float()
                    chosen = max_min_select(features, self.keep_count(len(idx)), resolution=RESOLUTION)
                    keep[b, index[chosen]] = True
                    n, d = features.shape
                    cost[b] += 2 * n * n * d + 3 * n * d + 2 * len(chosen) * n  # Gram, norms, greedy
            ctx.add_cost("DivPrune distances", cost)
            last = ctx.last_prompt_slot()
            keep |= (s.slots == last) & (last >= 0)  # generation continues from it
            return Keep(keep, compact=compact)

        return [Step(0, select)]

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        return [sum(self.keep_count(n) for n in images)] * num_layers

    @classmethod
    def bench_default(cls, num_layers: int) -> DivPrune:
        return cls()

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> DivPrune:
        if not 0 < budget <= 1:
            raise ConfigError(f"DivPrune: budget={budget} is outside (0, 1]")
        return cls(keep_ratio=budget)  # before the LLM every layer keeps the same share
