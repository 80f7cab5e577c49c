from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import pairwise

from ..engine.plan import Step
from ..errors import ConfigError, check_range, is_int, show
from ..registry import register_method
from .base import POSITIONS, QUERIES, Method, check_layer
from .select import keep_top_visual

#: the least share of the visual tokens ``at_budget`` lets the last stage keep (9 of LLaVA-1.5's 576)
MIN_LAST_SHARE = 1 / 64


@register_method("pyramiddrop")
@dataclass(frozen=True)
class PyramidDrop(Method):
    """PyramidDrop: drop a growing share of visual tokens at several layers (a pyramid of stages).

    At each layer in ``layers`` the visual tokens still present are ranked by the attention of the
    last instruction token, computed with that layer's own input norm, q/k projections and RoPE, and
    only ``keep_ratios[i]`` of the sample's *original* visual count survive (in original order).
    With the defaults on a 32-layer model: layers 0-7 see 576 visual tokens, 8-15 see 288, 16-23
    see 144, 24-31 see 72.

    Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
    Reduction" (Xing et al., CVPR 2025, arXiv 2410.17247). Reference code:
    https://github.com/Cooperx521/PyramidDrop

    Args:
        layers: strictly increasing layer indices, each in [1, num_layers - 1]. Default (8, 16, 24).
        keep_ratios: fraction of the original visual tokens kept from each layer on, each in (0, 1] and
            non-increasing; ``int(N * ratio)`` tokens. Default (0.5, 0.25, 0.125). No-op: all 1.0.
        query: "last" (default; the last prompt token, as the reference at inference) or "text".
        positions: "auto" (default: "compact" as the reference, i.e. positions re-numbered 0..n-1 after
            each drop and decode positions shifted by what each stage dropped; "original" on M-RoPE
            models such as Qwen2-VL, whose (t, h, w) ids can not be renumbered), "compact" or "original".

    Differences from the reference:
        - Works with left-padded batches at inference and with any number of images per prompt
          (the reference asserts batch size 1 at inference and handles one image per sample).
        - The scoring matmul expands keys for grouped-query attention (the reference assumes
          ``num_key_value_heads == num_heads``).
    """

    layers: tuple[int, ...] = (8, 16, 24)
    keep_ratios: tuple[float, ...] = (0.5, 0.25, 0.125)
    query: str = "last"
    positions: str = "auto"

    needs = ("scores",)
    reference_positions = "compact"

    def __post_init__(self):
        if not isinstance(self.layers, (list, tuple, range)):
            raise ConfigError(
                f"PyramidDrop: layers={show(self.layers)} must be a list, tuple or range of ints"
            )
        if not isinstance(self.keep_ratios, (list, tuple)):
            raise ConfigError(
                f"PyramidDrop: keep_ratios={show(self.keep_ratios)} must be a list or tuple of numbers"
            )
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "keep_ratios", tuple(self.keep_ratios))
        if not self.layers:
            raise ConfigError("PyramidDrop: layers=() must name at least one layer")
        for layer in self.layers:
            if not is_int(layer) or layer < 1:
                raise ConfigError(
                    f"PyramidDrop: layers={show(self.layers)} has {show(layer)}; each must be an int >= 1"
                )
        if len(self.layers) != len(self.keep_ratios):
            raise ConfigError(
                f"PyramidDrop: layers={show(self.layers)} and keep_ratios={show(self.keep_ratios)} must have the same length"
            )
        for a, b in pairwise(self.layers):
            if b <= a:
                raise ConfigError(
                    f"PyramidDrop: layers={show(self.layers)} must be strictly increasing ({show(a)} then {show(b)})"
                )
        for r in self.keep_ratios:
            check_range("PyramidDrop", "keep_ratios", r, 0, 1, low_open=True)
        for a, b in pairwise(self.keep_ratios):
            if b > a:
                raise ConfigError(
                    f"PyramidDrop: keep_ratios={show(self.keep_ratios)} must be non-increasing ({a} then {b})"
                )
        self._check_choice("query", self.query, QUERIES)
        self._check_choice("positions", self.positions, POSITIONS)

    @classmethod
    def bench_default(cls, num_layers: int) -> PyramidDrop:
        if num_layers >= 25:
            return cls()
        return cls.at_budget(
            270 / 576, num_layers
        )  # the default's layer-averaged share, on a shallower model

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> PyramidDrop:
        """Four even stages with a geometric ratio lambda chosen so the layer average equals ``budget``. A
        budget whose last stage would keep less than ``MIN_LAST_SHARE`` (1/64) of the visual tokens is
        refused with ConfigError (the bench skips it and records why): on a 32-layer model, below 0.333."""
        if num_layers < 4:
            raise ConfigError(f"PyramidDrop: at_budget needs at least 4 layers, got {num_layers}")
        layers = tuple(round(num_layers * k / 4) for k in (1, 2, 3))
        spans = [b - a for a, b in pairwise((0, *layers, num_layers))]

        def average(lam: float) -> float:
            return sum(span * lam**i for i, span in enumerate(spans)) / num_layers

        if not average(0.0) < budget <= 1:
            raise ConfigError(
                f"PyramidDrop: budget={budget} is outside ({average(0.0):.3g}, 1] with stages at layers {layers}"
            )
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if average(mid) < budget else (lo, mid)
        lam = hi
        if lam**3 < MIN_LAST_SHARE:  # e.g. budget 0.3: 2 of 576 visual tokens in the last stage
            lowest = math.ceil(average(MIN_LAST_SHARE ** (1 / 3)) * 1000) / 1000
            raise ConfigError(
                f"PyramidDrop: budget={budget} needs a keep ratio of {lam:.3g} per stage, so the last stage "
                f"would keep {lam**3:.2%} of the visual tokens ({int(576 * lam**3)} of LLaVA-1.5's 576); "
                f"the lowest budget that keeps 1/{round(1 / MIN_LAST_SHARE)} of them there, with stages at "
                f"layers {layers}, is {lowest:g}"
            )
        return cls(layers=layers, keep_ratios=tuple(round(lam**i, 6) for i in (1, 2, 3)))

    def check_model(self, num_layers: int) -> None:
        for i, layer in enumerate(self.layers):
            check_layer("PyramidDrop", f"layers[{i}]", layer, num_layers)

    def keep_count(self, stage: int, n_visual: int) -> int:
        """Visual tokens kept from stage ``stage`` on (of ``n_visual`` in the input)."""
        return int(n_visual * self.keep_ratios[stage])

    def plan(self, adapter) -> list[Step]:
        compact = self.resolved_positions(adapter.supports_compact_positions) == "compact"

        def drop(ctx, stage: int):  # rank on the stage's first layer's own input, then drop
            keep = functools.partial(self.keep_count, stage)
            return keep_top_visual(ctx, ctx.attention(self.query), keep, compact, owner="PyramidDrop")

        return [Step(layer, functools.partial(drop, stage=i)) for i, layer in enumerate(self.layers)]

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        n = sum(images)
        out, current = [n] * num_layers, n
        for i, layer in enumerate(self.layers):
            current = min(self.keep_count(i, n), current)
            out[layer:] = [current] * (num_layers - layer)
        return out

    def scoring_layers(self, num_layers: int) -> list[int]:
        return list(self.layers)

    @property
    def is_noop(self) -> bool:
        return all(r == 1.0 for r in self.keep_ratios)
