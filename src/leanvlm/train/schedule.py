"""Staged schedules: which method is active during which part of training (LLaVolta)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, check_range, show
from ..methods.base import Method
from ..methods.llavolta import VisualContextCompression


@dataclass(frozen=True)
class StagedSchedule:
    """A sequence of (fraction of training, method or None) stages; the fractions sum to 1.

    The active stage follows the optimizer step: step ``s`` of ``total`` falls in the stage whose
    cumulative fraction first exceeds ``s / total``. LLaVolta anneals compression this way and ends
    with no compression, so the trained model runs uncompressed at test time.

    Presets (:meth:`preset`), from LLaVolta's ``scripts/v1_5/train-*.sh``:
      - ``"4stage"``: quarters with stride 8 at layer 2, stride 2 at layer 2, stride 2 at layer 16, off;
      - ``"heavy"``: stride 8 at layer 2 throughout;
      - ``"light"``: stride 8 at layer 16 throughout.
    """

    stages: tuple[tuple[float, Method | None], ...]

    def __post_init__(self):
        if not isinstance(self.stages, (list, tuple)):
            raise ConfigError(
                f"StagedSchedule: stages={show(self.stages)} must be a list or tuple of (fraction, method) stages"
            )
        if not self.stages:
            raise ConfigError("StagedSchedule: stages=() must hold at least one (fraction, method) stage")
        stages = []
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, (list, tuple)) or len(stage) != 2:
                raise ConfigError(
                    f"StagedSchedule: stage {i}={show(stage)} must be a (fraction, method) pair"
                )
            fraction, method = stage
            check_range("StagedSchedule", f"stage {i} fraction", fraction, 0, 1, low_open=True)
            if method is not None and not isinstance(method, Method):
                raise ConfigError(
                    f"StagedSchedule: stage {i} method={show(method)} is not a method config (or None)"
                )
            stages.append((float(fraction), method))
        object.__setattr__(self, "stages", tuple(stages))
        total = math.fsum(f for f, _ in self.stages)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ConfigError(f"StagedSchedule: fractions sum to {total:g}; they must sum to 1")

    @classmethod
    def preset(cls, name: str) -> StagedSchedule:
        vcc = VisualContextCompression
        presets = {
            "4stage": (
                (0.25, vcc(layer=2, stride=8)),
                (0.25, vcc(layer=2, stride=2)),
                (0.25, vcc(layer=16, stride=2)),
                (0.25, None),
            ),
            "heavy": ((1.0, vcc(layer=2, stride=8)),),
            "light": ((1.0, vcc(layer=16, stride=8)),),
        }
        if name not in presets:
            raise ConfigError(f"StagedSchedule: unknown preset {name!r}; presets: {', '.join(presets)}")
        return cls(presets[name])

    def stage_index(self, step: int, total_steps: int) -> int:
        if total_steps <= 0:
            raise ConfigError(f"StagedSchedule: total_steps={total_steps} must be > 0")
        progress = min(max(step, 0) / total_steps, 1.0)
        edge = 0.0
        for i, (fraction, _) in enumerate(self.stages):
            edge += fraction
            if progress < edge - 1e-12:
                return i
        return len(self.stages) - 1

    def method_at(self, step: int, total_steps: int) -> Method | None:
        return self.stages[self.stage_index(step, total_steps)][1]

    def boundaries(self, total_steps: int) -> list[int]:
        """The first optimizer step of each stage."""
        out, edge = [], 0.0
        for fraction, _ in self.stages:
            out.append(math.ceil(edge * total_steps - 1e-9))
            edge += fraction
        return out

    def check_model(self, num_layers: int) -> None:
        for _, method in self.stages:
            if method is not None:
                method.check_model(num_layers)
