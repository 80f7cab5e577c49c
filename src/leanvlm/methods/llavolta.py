from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.edits import Merge
from ..engine.plan import Step
from ..errors import ConfigError, LeanVLMError, is_int, show
from ..registry import register_method
from .base import Method, check_layer, early_layer_for_budget

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

    needs = ("image_ids",)

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

    def plan(self, adapter) -> list[Step]:
        grid = adapter.fixed_grid if self.pool == "2d" else None
        return [Step(self.layer, lambda ctx: Merge(self.groups(ctx, grid), self.merge_position))]

    def groups(self, ctx, grid) -> torch.Tensor:
        """[B, n]: for each slot, the slot that leads its group (itself for tokens that are not merged).

        Groups never cross images (the adapter says which image each visual token belongs to; two images
        back to back are two images): "1d" groups ``stride`` consecutive tokens of an image, "2d" square
        blocks of the image's grid. The last prompt token is never merged: generation continues from it,
        even when the prompt ends with an image."""
        s = ctx.state
        b, n = s.orig.shape
        leader = s.slots.clone()
        last = ctx.last_prompt_slot()[:, 0].tolist()
        image = ctx.image_ids().tolist()
        side = math.isqrt(self.stride)
        for bi, members in enumerate(ctx.image_slots()):
            for img, idx in members.items():
                length = len(idx)
                if grid is None:
                    stride = min(self.stride, length)
                    offsets = [k // stride * stride for k in range(length)]
                else:
                    rows, cols = grid
                    if rows * cols != length:
                        raise LeanVLMError(
                            f"2-D pooling: image {img} has {length} visual tokens, which does not match its "
                            f"{rows}x{cols} grid"
                        )
                    offsets = [
                        (k // cols) // side * side * cols + (k % cols) // side * side for k in range(length)
                    ]
                for k, o in zip(idx, offsets, strict=True):
                    leader[bi, k] = idx[o]
            if last[bi] >= 0 and image[bi][last[bi]] >= 0:
                # the last prompt token is visual: it stays on its own; its group is led by the next member
                group = (leader[bi] == leader[bi, last[bi]]).nonzero()[:, 0]
                rest = group[group != last[bi]]
                if len(rest):
                    leader[bi, rest] = rest[0]
                leader[bi, last[bi]] = last[bi]
        return leader

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        n = sum(images)
        pooled = sum(-(-r // self.stride) for r in images)  # 1-D; 2-D blocks tile the grid alike
        return [n] * self.layer + [pooled] * (num_layers - self.layer)

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
