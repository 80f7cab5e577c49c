"""Train with token reduction through the Hugging Face Trainer: one callback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..api import Applied, apply
from ..errors import ConfigError
from ..methods.base import Method
from ..methods.spec import build_method
from ..modules import prepare, save_modules
from .schedule import StagedSchedule


class ReductionCallback(TrainerCallback, ExportableState):
    """Applies a method (or the active stage of a :class:`StagedSchedule`) to the model being trained.

    ``trainer = Trainer(model, args, ..., callbacks=[lv.train.ReductionCallback(lv.PyramidDrop())])``

    The schedule advances on optimizer steps (``state.global_step`` / ``state.max_steps``), not on
    forward calls, so gradient accumulation does not change it; its position is stored in Trainer
    checkpoints (and is also implied by the restored global step, so resuming continues the schedule).
    With labels, the loss is computed on the labels of the tokens the last layer kept (visual labels
    are ignored anyway; text is never dropped), and PyramidDrop ranks with the token before each
    answer span, without gradient through the ranking.
    """

    def __init__(self, method_or_schedule: Method | StagedSchedule | None = None, *, schedule_spec=None):
        if schedule_spec is not None:  # rebuilt by the Trainer from a checkpoint's stored state
            method_or_schedule = schedule_from_spec(schedule_spec)
        if method_or_schedule is None or isinstance(method_or_schedule, Method):
            method_or_schedule = StagedSchedule(((1.0, method_or_schedule),))
        if not isinstance(method_or_schedule, StagedSchedule):
            raise ConfigError(
                f"ReductionCallback takes a method config, a StagedSchedule or None; got {method_or_schedule!r}"
            )
        self.schedule = method_or_schedule
        self.stage_index: int | None = None
        self.handle: Applied | None = None
        self.switches: list[tuple[int, int]] = []  # (global step, stage index) each time the stage changed

    # --- Trainer events ---------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        # the Trainer builds its optimizer later, in train(): trainable parts attached now are trained
        if model is not None:
            prepare(_unwrap(model), *self.trainable_methods())

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_modules(_unwrap(model), folder)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.schedule.check_model(_num_layers(model))
        self._activate(model, state)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._activate(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._deactivate()

    # --- checkpoint state -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "args": {"schedule_spec": schedule_to_spec(self.schedule)},
            "attributes": {"stage_index": self.stage_index, "switches": self.switches},
        }

    def trainable_methods(self) -> list[Method]:
        """The schedule's methods that have modules of their own (``lv.prepare`` attaches them)."""
        return [m for _, m in self.schedule.stages if m is not None and m.trainable]

    # --- internals ---------------------------------------------------------------------------------------
    def _activate(self, model, state) -> None:
        total = state.max_steps or 1
        index = self.schedule.stage_index(state.global_step, total)
        if index == self.stage_index and self.handle is not None:
            return
        self._deactivate()
        method = self.schedule.stages[index][1]
        self.handle = apply(_unwrap(model), *([method] if method is not None else []))
        self.stage_index = index
        self.switches.append((state.global_step, index))

    def _deactivate(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def schedule_to_spec(schedule: StagedSchedule) -> list:
    """JSON form of a schedule: [[fraction, method name or None, {field: value}], ...]."""
    out = []
    for fraction, method in schedule.stages:
        if method is None:
            out.append([fraction, None, {}])
        elif getattr(method, "name", None) is None:
            raise ConfigError(
                f"{type(method).__name__} is not registered: checkpoints store methods by name; register it "
                "with leanvlm.registry.register_method(name)"
            )
        else:
            fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
            out.append(
                [
                    fraction,
                    method.name,
                    {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
                ]
            )
    return out


def schedule_from_spec(spec: list) -> StagedSchedule:
    return StagedSchedule(
        tuple((fraction, build_method(name or "none", kwargs)) for fraction, name, kwargs in spec)
    )


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    return model


def _num_layers(model) -> int:
    from ..registry import find_adapter

    return find_adapter(_unwrap(model)).num_layers
