"""Reference points every honest comparison needs: random and evenly spaced visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.plan import Step
from ..errors import ConfigError, check_range, is_int, show
from ..registry import register_method
from .base import POSITIONS, Method, check_layer
from .select import keep_top_visual


class _Baseline(Method):
    """Shared by RandomDrop and UniformDrop: where they act, how many tokens they keep."""

    layer: int
    keep_ratio: float
    keep_tokens: int | None
    positions: str

    def _check(self) -> None:
        owner = type(self).__name__
        if not is_int(self.layer) or self.layer < 0:
            raise ConfigError(f"{owner}: layer={show(self.layer)} must be an int >= 0 (0: before the LLM)")
        check_range(owner, "keep_ratio", self.keep_ratio, 0, 1, low_open=True)
        if self.keep_tokens is not None and (not is_int(self.keep_tokens) or self.keep_tokens < 0):
            raise ConfigError(f"{owner}: keep_tokens={show(self.keep_tokens)} must be an int >= 0 (or None)")
        self._check_choice("positions", self.positions, POSITIONS)

    @property
    def stage(self) -> str:  # layer 0 acts before the LLM (every layer's cache is shorter)
        return "input" if self.layer == 0 else "llm"

    def check_model(self, num_layers: int) -> None:
        if self.layer:
            check_layer(type(self).__name__, "layer", self.layer, num_layers)

    @property
    def is_noop(self) -> bool:
        return self.keep_tokens is None and self.keep_ratio == 1.0

    def keep_count(self, n_visual: int) -> int:
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n_visual)
        return int(n_visual * self.keep_ratio)

    def scores(self, ctx) -> torch.Tensor:
        """[B, n] a score per slot; the best ``keep_count`` visual tokens of each sample are kept."""
        raise NotImplementedError

    def plan(self, adapter) -> list[Step]:
        compact = self.resolved_positions(adapter.supports_compact_positions) == "compact"

        def drop(ctx):  # no query: in training every sample is reduced alike
            return keep_top_visual(ctx, self.scores(ctx), self.keep_count, compact, needs_query=False)

        return [Step(self.layer, drop)]

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        n = sum(images)
        return [n] * self.layer + [min(self.keep_count(n), n)] * (num_layers - self.layer)

    @classmethod
    def bench_default(cls, num_layers: int):
        return cls(keep_ratio=0.25)  # before the LLM, FastV's default share (144 of 576)

    @classmethod
    def at_budget(cls, budget: float, num_layers: int):
        if not 0 < budget <= 1:
            raise ConfigError(f"{cls.__name__}: budget={budget} is outside (0, 1]")
        return cls(keep_ratio=budget)  # before the LLM every layer keeps the same share


def _rank_among_visual(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each visual slot among its sample's visual slots, in order; the sample's visual count)."""
    visual = ctx.state.visual
    return visual.long().cumsum(-1) - 1, visual.sum(-1)


@register_method("random")
@dataclass(frozen=True)
class RandomDrop(_Baseline):
    """Keep a random subset of each sample's visual tokens (text untouched, order preserved).

    ``layer=0`` (default) reduces before the LLM: every layer, and its cache, sees the subset. ``layer=K``
    keeps everything in layers 0..K-1 and drops at K. Deterministic for a ``seed``: the draw depends
    on the seed and the sample's visual-token count only, so a sample is reduced alike alone and in
    any batch, with and without a KV cache.

    Recent benchmark studies (UniPruneBench; Wen et al., ACL Findings 2025) find random selection a
    strong baseline; report it next to any method.

    Args:
        layer: 0 (before the LLM) or the first decoder layer that sees the subset. Default 0.
        keep_ratio: share of each sample's visual tokens kept, in (0, 1]. Default 0.5. No-op: 1.0.
        keep_tokens: keep exactly this many visual tokens per sample instead.
        seed: the random draw's seed.
        positions: "auto"/"original" (kept tokens keep their RoPE positions) or "compact".
    """

    layer: int = 0
    keep_ratio: float = 0.5
    keep_tokens: int | None = None
    seed: int = 0
    positions: str = "auto"

    def __post_init__(self):
        self._check()
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"RandomDrop: seed={show(self.seed)} must be an int in [0, 2**63)")

    def scores(self, ctx) -> torch.Tensor:
        rank, counts = _rank_among_visual(ctx)
        longest = int(counts.max()) if counts.numel() else 0
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.rand(max(longest, 1), generator=generator).to(
            rank.device
        )  # the same draw for every sample
        return draw[rank.clamp(0, max(longest - 1, 0))].masked_fill(~ctx.state.visual, 0.0)


@register_method("uniform")
@dataclass(frozen=True)
class UniformDrop(_Baseline):
    """Keep evenly spaced visual tokens: of a sample's N visual tokens (in the model's order: raster
    order per image, images one after another) keep k at ``floor((i + 1/2) * N / k)``, i = 0..k-1.

    On one image this is a strided subset in raster order (a stride that divides the grid's width
    keeps whole columns); it is not a 2-D lattice. ``layer``, ``keep_ratio``, ``keep_tokens`` and
    ``positions`` as :class:`RandomDrop`.
    """

    layer: int = 0
    keep_ratio: float = 0.5
    keep_tokens: int | None = None
    positions: str = "auto"

    def __post_init__(self):
        self._check()

    def scores(self, ctx) -> torch.Tensor:
        rank, counts = _rank_among_visual(ctx)
        wanted = torch.tensor([self.keep_count(n) for n in ctx.visual_counts], device=rank.device)
        # slot i of k sits at floor((i + 1/2) * N / k): a visual token is picked when it is one of them
        n = counts[:, None].clamp_min(1)
        k = wanted[:, None].clamp_min(1)
        i = torch.floor((rank * k) / n)  # the pick whose interval the token falls in
        picked = torch.floor((2 * i + 1) * n / (2 * k)) == rank
        return picked.float().masked_fill(~ctx.state.visual, 0.0)
