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
            return keep_top_visual(
                ctx, self.scores(ctx), self.keep_count, compact, needs_query=False, owner=type(self).__name__
            )

        return [Step(self.layer, drop)]

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        n = sum(images)
        return [n] * self.layer + [min(self.keep_count(n), n)] * (num_layers - self.layer)

    @classmethod
    def bench_default(cls, num_layers: int):
        return cls()  # the class's default: half of the visual tokens, before the LLM

    @classmethod
    def at_budget(cls, budget: float, num_layers: int):
        if not 0 < budget <= 1:
            raise ConfigError(f"{cls.__name__}: budget={budget} is outside (0, 1]")
        return cls(keep_ratio=budget)  # before the LLM every layer keeps the same share


def split(k: int, sizes: list[int]) -> list[int]:
    """``k`` split over parts of ``sizes`` in proportion (largest remainders; ties to earlier parts)."""
    total = sum(sizes)
    if not total:
        return [0] * len(sizes)
    exact = [k * n / total for n in sizes]
    out = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: k - sum(out)]:
        out[i] += 1
    return out


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


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``n`` evenly spaced: ``floor((i + 1/2) * n / k)``, i = 0..k-1."""
    return [int((2 * i + 1) * n // (2 * k)) for i in range(k)] if k else []


def lattice(rows: int, cols: int, k: int) -> list[int]:
    """``k`` raster indices of a ``rows`` x ``cols`` grid, evenly spaced in both directions: an a x b
    lattice (a / b close to the grid's aspect, a * b >= k) of cell centres ``floor((i + 1/2) * rows /
    a)``, ``floor((j + 1/2) * cols / b)``, of which ``k`` evenly spaced in raster order are taken."""
    if k >= rows * cols:
        return list(range(rows * cols))
    if k <= 0:
        return []
    a = max(1, min(rows, round((k * rows / cols) ** 0.5)))
    b = max(1, min(cols, -(-k // a)))
    a = max(a, min(rows, -(-k // b)))  # a * b >= k
    points = [r * cols + c for r in spread(rows, a) for c in spread(cols, b)]
    return [points[i] for i in spread(len(points), k)]


@register_method("uniform")
@dataclass(frozen=True)
class UniformDrop(_Baseline):
    """Keep evenly spaced visual tokens on each image's grid.

    A sample keeps ``k = keep_count(N)`` of its N visual tokens, split over its images in proportion to
    their tokens (largest remainders, earlier images first). An image whose grid the model's layout
    gives (LLaVA-1.5's fixed grid; Qwen-VL's merged grid of an image or video frame, when its token
    count matches one grid of the call) keeps a 2-D lattice (:func:`lattice`); other images (LLaVA-NeXT's
    packed tiles) keep ``floor((i + 1/2) * n / k_image)`` in raster order. ``layer``, ``keep_ratio``,
    ``keep_tokens`` and ``positions`` as :class:`RandomDrop`.
    """

    layer: int = 0
    keep_ratio: float = 0.5
    keep_tokens: int | None = None
    positions: str = "auto"

    def __post_init__(self):
        self._check()

    def scores(self, ctx) -> torch.Tensor:
        s = ctx.state
        picked = torch.zeros(s.orig.shape, device=s.orig.device)
        for b, images in enumerate(ctx.image_slots()):
            slots = list(images.values())
            sizes = [len(idx) for idx in slots]
            for idx, k in zip(slots, split(self.keep_count(sum(sizes)), sizes), strict=True):
                grid = ctx.adapter.token_grid(len(idx), ctx.vision_inputs)
                chosen = lattice(*grid, k) if grid else spread(len(idx), k)
                picked[b, [idx[i] for i in chosen]] = 1.0
        return picked.masked_fill(~s.visual, 0.0)
