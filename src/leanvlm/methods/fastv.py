from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..engine.plan import Step
from ..errors import ConfigError, check_range, is_int, show
from ..registry import register_method
from .base import POSITIONS, QUERIES, Method, check_layer, early_layer_for_budget
from .select import keep_top_visual


@register_method("fastv")
@dataclass(frozen=True)
class FastV(Method):
    """FastV: drop the least-attended visual tokens once, after an early layer.

    Layers ``0 .. layer-1`` see every token. The attention that layer ``layer-1`` pays from the last
    prompt token (or, with ``query="text"``, the mean over the prompt's text tokens) to each visual
    token ranks them; from layer ``layer`` on only the top ``keep_ratio`` (or ``keep_tokens``) survive,
    in their original order. Text tokens are never dropped.

    Paper: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv 2403.06764).
    Reference code: https://github.com/pkunlp-icler/FastV

    Args:
        layer: K, the first layer that sees the reduced set; in [1, num_layers - 1]. Default 2.
        keep_ratio: fraction of each sample's visual tokens kept, in (0, 1]; ``int(N * keep_ratio)``
            tokens. Default 0.5. No-op: 1.0.
        keep_tokens: keep exactly this many visual tokens per sample (>= 0) instead of a ratio.
        query: "last" (the reference code) or "text" (the mean over text tokens, as the paper states).
        positions: "auto" (default: "original", as the reference: kept tokens keep their RoPE
            positions), "original", or "compact" (re-numbered 0..n-1 after the drop; not on M-RoPE models).

    Differences from the reference:
        - The ranking attention is recomputed from layer K-1's own norm, q/k projections and RoPE for
          the query rows only, so any attention kernel (sdpa, flash) works; the reference needs eager.
        - Visual tokens are located from the image placeholder ids per sample (the reference hard-codes a
          system-prompt length of 35/36 and 576 visual tokens), so batches, padding, several images and
          text-only prompts work. Keep counts are per sample.
        - With a KV cache the drop happens once, in the prefill (the reference's HF/lmms-eval paths);
          without a cache, generation keeps ranking with the last *prompt* token so both give the same
          tokens (the original no-cache fork re-ranks with each newest token).
    """

    layer: int = 2
    keep_ratio: float = 0.5
    keep_tokens: int | None = None
    query: str = "last"
    positions: str = "auto"

    needs = ("scores",)
    reference_positions = "original"

    def __post_init__(self):
        if not is_int(self.layer):
            raise ConfigError(f"FastV: layer={show(self.layer)} must be an int >= 1")
        if self.layer < 1:
            raise ConfigError(f"FastV: layer={show(self.layer)} is outside [1, num_layers - 1]")
        check_range("FastV", "keep_ratio", self.keep_ratio, 0, 1, low_open=True)
        if self.keep_tokens is not None and (not is_int(self.keep_tokens) or self.keep_tokens < 0):
            raise ConfigError(f"FastV: keep_tokens={show(self.keep_tokens)} must be an int >= 0 (or None)")
        if self.keep_tokens == 0:
            warnings.warn(
                f"FastV: keep_tokens=0 keeps no visual token: from layer {self.layer} on the model sees no image",
                stacklevel=3,
            )
        self._check_choice("query", self.query, QUERIES)
        self._check_choice("positions", self.positions, POSITIONS)

    @classmethod
    def bench_default(cls, num_layers: int) -> FastV:
        return cls(layer=min(2, num_layers - 1))

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> FastV:
        layer = early_layer_for_budget("FastV", budget, num_layers)
        return cls(layer=layer, keep_ratio=round((budget * num_layers - layer) / (num_layers - layer), 6))

    def check_model(self, num_layers: int) -> None:
        check_layer("FastV", "layer", self.layer, num_layers)

    def keep_count(self, n_visual: int) -> int:
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n_visual)
        return int(n_visual * self.keep_ratio)

    def plan(self, adapter) -> list[Step]:
        compact = self.resolved_positions(adapter.supports_compact_positions) == "compact"

        def rank(ctx):  # layer K-1's attention, on its own input
            return ctx.to_tokens(ctx.attention(self.query))

        def drop(ctx):
            scores = ctx.from_tokens(ctx.observed)
            # keep_tokens=0 was warned about when the config was made
            owner = None if self.keep_tokens == 0 else "FastV"
            return keep_top_visual(ctx, scores, self.keep_count, compact, owner=owner)

        return [Step(self.layer, drop, observe=rank, observe_layer=self.layer - 1)]

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        n = sum(images)
        return [n] * self.layer + [min(self.keep_count(n), n)] * (num_layers - self.layer)

    def scoring_layers(self, num_layers: int) -> list[int]:
        return [self.layer - 1]

    @property
    def is_noop(self) -> bool:
        return self.keep_tokens is None and self.keep_ratio == 1.0
