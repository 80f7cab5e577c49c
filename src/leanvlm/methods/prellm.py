"""Shared by the methods that select each image's visual tokens before the LLM (DivPrune, CDPruner):
the budget (``keep_ratio`` or ``keep_tokens`` per image), its checks, and the input-stage step that runs
a per-image selection on the projected image features."""

from __future__ import annotations

import torch

from ..engine.edits import Keep
from ..engine.plan import Step
from ..errors import ConfigError, check_range, is_int, show
from .base import POSITIONS, Method


def first_items(counts: list[int], replicas: int = 1) -> list[int]:
    """Per sample with ``counts[b]`` items (images, frames): the index of its first item among the items
    the vision tower ran, when each run of ``replicas`` consecutive samples are copies of one sample
    whose items the tower ran once."""
    firsts, total = [], 0
    for c in counts[::replicas]:
        firsts.append(total)
        total += c
    return [firsts[b // replicas] for b in range(len(counts))]


class PerImageSelection(Method):
    """A method that keeps, of each image's N visual tokens, ``round(N * keep_ratio)`` (or
    ``keep_tokens``) chosen by :meth:`select`, before the LLM. Text is untouched; the kept tokens keep
    their order; the last prompt token is never dropped (kept on top of the budget when it is visual)."""

    stage = "input"
    needs = ("image_ids",)
    reference_positions = "compact"

    keep_ratio: float
    keep_tokens: int | None
    positions: str

    def _check_budget(self) -> None:
        owner = type(self).__name__
        check_range(owner, "keep_ratio", self.keep_ratio, 0, 1, low_open=True)
        if self.keep_tokens is not None and (not is_int(self.keep_tokens) or self.keep_tokens < 1):
            raise ConfigError(f"{owner}: keep_tokens={show(self.keep_tokens)} must be an int >= 1 (or None)")
        self._check_choice("positions", self.positions, POSITIONS)

    @property
    def is_noop(self) -> bool:
        return self.keep_tokens is None and self.keep_ratio == 1.0

    def keep_count(self, n_image: int) -> int:
        """Visual tokens kept of an image with ``n_image`` (Python's round: half to even, as the
        references). ``keep_tokens`` above ``n_image`` raises ConfigError with the allowed range."""
        if self.keep_tokens is not None:
            if self.keep_tokens > n_image:
                raise ConfigError(
                    f"{type(self).__name__}: keep_tokens={self.keep_tokens} is more than an image of this input "
                    f"has ({n_image} visual tokens); allowed: 1..{n_image} (or keep_ratio)"
                )
            return self.keep_tokens
        return min(max(1, int(round(self.keep_ratio * n_image))), n_image)  # an image keeps at least one

    def select(self, ctx, b: int, slots: torch.Tensor, features: torch.Tensor, k: int):
        """(chosen indices into ``slots``, FLOPs spent) for one image of sample ``b``: ``features`` [N, D]
        (float32, detached) are its visual slots' projected features, ``k`` how many to keep."""
        raise NotImplementedError

    def image_cost(self, n: int, d: int, k: int, text: int) -> int:
        """FLOPs of selecting ``k`` of ``n`` tokens of width ``d`` (``text``: text tokens it reads)."""
        raise NotImplementedError

    def selection_flops(self, shape, images: list[int], text_tokens: int) -> int:
        return sum(self.image_cost(n, shape.text.hidden, self.keep_count(n), text_tokens) for n in images)

    def plan(self, adapter) -> list[Step]:
        compact = self.resolved_positions(adapter.supports_compact_positions) == "compact"
        label = f"{type(self).__name__} selection"

        def step(ctx):
            s, hidden = ctx.state, ctx.hidden
            keep = ~s.visual
            cost = torch.zeros(hidden.shape[0], dtype=torch.long)
            for b, images in enumerate(ctx.image_slots()):
                for idx in images.values():
                    slots = torch.tensor(idx, device=hidden.device)
                    features = hidden[b, slots].detach().float()
                    chosen, flops = self.select(ctx, b, slots, features, self.keep_count(len(idx)))
                    keep[b, slots[chosen]] = True
                    cost[b] += flops
            ctx.add_cost(label, cost)
            last = ctx.last_prompt_slot()
            keep |= (s.slots == last) & (last >= 0)  # generation continues from it
            return Keep(keep, compact=compact)

        return [Step(0, step)]

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        return [sum(self.keep_count(n) for n in images)] * num_layers

    @classmethod
    def bench_default(cls, num_layers: int) -> Method:
        return cls()

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> Method:
        if not 0 < budget <= 1:
            raise ConfigError(f"{cls.__name__}: budget={budget} is outside (0, 1]")
        return cls(keep_ratio=budget)  # before the LLM every layer keeps the same share
