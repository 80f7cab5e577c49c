from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, is_int, show
from ..registry import register_method
from .base import MergeStage, Method, check_layer, early_layer_for_budget

POOLS = ("1d", "2d")
MERGE_POSITIONS = ("mean", "first")


@register_method("vcc", aliases=("llavolta",))
@dataclass(frozen=True)
class VisualContextCompression(Method):
    """LLaVolta's Visual Context Compressor: average-pool visual tokens inside the LLM.

    From layer ``layer`` on, every group of ``stride`` neighbouring visual tokens of an image is
    replaced by one token, the mean of their hidden states (kernel = stride). No scores: the
    compression is input-agnostic, so it trains stably and works with any attention kernel.
    Staged training (heavy compression early, none at the end) is :class:`leanvlm.StagedSchedule`.

    Paper: "Efficient Large Multi-modal Models via Visual Context Compression" (Chen et al.,
    NeurIPS 2024, arXiv 2406.20092). Reference code: https://github.com/Beckschen/LLaVolta

    Args:
        layer: G, the first layer that sees the pooled tokens; in [1, num_layers - 1]. Default 2.
        stride: visual tokens per pooled token, >= 1. Default 8. No-op: 1.
        pool: "1d" (default, as the reference: consecutive tokens in raster order, so stride 8 on a
            24x24 grid averages 8 horizontal neighbours) or "2d" (square blocks of the image grid;
            stride must be a square number, e.g. 4 = 2x2; needs a model with a fixed grid).
        merge_position: "mean" (default, as the reference: the floor of the group's mean position id)
            or "first" (the group's first position id). Text tokens keep their original positions.

    Differences from the reference:
        - The reference pools exactly 576 tokens per image (LLaVA-1.5 only) and needs the same number
          of images in every sample of a batch; here each image is pooled on its own, never across
          images (the adapter tells which tokens belong to which image, so two images back to back
          stay apart; any grid size; a shorter last group when the count is not a multiple of the
          stride), and samples with different visual counts (or none) share a batch.
        - The last prompt token is never pooled (generation continues from it).
        - Positions are pooled in integer arithmetic (the reference pools them in fp16, which rounds
          above 1024); "first" is offered as the alternative position.
        - Layer 0 (pooling the LLM input) is not offered: the engine keeps layer 0 uncompressed so
          that transformers' cache length and decode positions stay in original coordinates.
    """

    layer: int = 2
    stride: int = 8
    pool: str = "1d"
    merge_position: str = "mean"

    needs_scores = False

    def __post_init__(self):
        if not is_int(self.layer) or self.layer < 1:
            raise ConfigError(
                f"VisualContextCompression: layer={show(self.layer)} must be an int >= 1 (layer 0 is not supported)"
            )
        if not is_int(self.stride) or self.stride < 1:
            raise ConfigError(f"VisualContextCompression: stride={show(self.stride)} must be an int >= 1")
        self._check_choice("pool", self.pool, POOLS)
        self._check_choice("merge_position", self.merge_position, MERGE_POSITIONS)
        if self.pool == "2d" and math.isqrt(self.stride) ** 2 != self.stride:
            raise ConfigError(
                f"VisualContextCompression: stride={show(self.stride)} must be a square number with pool='2d' (4, 9, 16, ...)"
            )

    @property
    def positions(self) -> str:  # merged tokens get pooled original positions (see merge_position)
        return "original"

    @property
    def query(self) -> str:
        return "last"

    def check_adapter(self, adapter) -> None:
        if self.pool == "2d" and adapter.fixed_grid is None:
            raise ConfigError(
                f"VisualContextCompression: pool='2d' needs every image on one fixed grid, which "
                f"{type(adapter.model).__name__} does not have; use pool='1d'"
            )

    def check_model(self, num_layers: int) -> None:
        check_layer("VisualContextCompression", "layer", self.layer, num_layers)

    def drop_stages(self, num_layers: int) -> list[MergeStage]:
        return [MergeStage(self.layer, self.stride, self.pool, self.merge_position)]

    @property
    def is_noop(self) -> bool:
        return self.stride == 1

    @classmethod
    def bench_default(cls, num_layers: int) -> VisualContextCompression:
        return cls(layer=min(2, num_layers - 1), stride=8)  # LLaVolta's "heavy compression" setting

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> VisualContextCompression:
        """The integer stride whose layer average is closest to ``budget`` (pooling can not hit it exactly)."""
        layer = early_layer_for_budget("VisualContextCompression", budget, num_layers)
        stride = max(1, round((num_layers - layer) / (budget * num_layers - layer)))
        return cls(layer=layer, stride=stride)
