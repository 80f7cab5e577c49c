"""Training with token reduction: staged schedules, the Trainer callback, the LLaVA-format recipe."""

from .schedule import StagedSchedule

__all__ = ["LlavaJsonDataset", "ReductionCallback", "StagedSchedule", "collate"]


def __getattr__(name):  # the Trainer machinery is imported only when training is used
    if name == "ReductionCallback":
        from .callback import ReductionCallback

        return ReductionCallback
    if name in ("LlavaJsonDataset", "collate"):
        from . import data

        return getattr(data, name)
    raise AttributeError(name)
