"""Training with an edited sequence: the loss of the full sequence on the tokens that are left, and the
query rows that rank tokens when there is no "last prompt token" (the token before each answer span)."""

from __future__ import annotations

import torch

from ..errors import LeanVLMError
from .state import INSERTED, TokenState

IGNORE_INDEX = -100


def next_token_targets(
    labels: torch.Tensor | None, shift_labels: torch.Tensor | None, state: TokenState
) -> torch.Tensor:
    """[B, n] the target each slot of the last layer's output predicts (``shift_labels`` form), so that a
    causal-LM loss on the shorter logits is the loss of the full sequence: a slot predicts its original
    token's next token; inserted tokens and fillers predict nothing. Every position with a target (and,
    with ``labels``, every supervised token) must still be there; otherwise this raises."""
    if shift_labels is None:
        shift_labels = torch.full_like(labels, IGNORE_INDEX)
        shift_labels[:, :-1] = labels[:, 1:]
    real = state.valid & (state.kind != INSERTED)
    counts = torch.zeros(shift_labels.shape, dtype=torch.long, device=state.orig.device)
    present = counts.scatter_add_(1, state.orig, real.long()).to(shift_labels.device) > 0
    needed = shift_labels != IGNORE_INDEX
    if labels is not None:
        needed = needed | (labels != IGNORE_INDEX)
    if bool((needed & ~present).any()):
        b, p = (needed & ~present).nonzero()[0].tolist()
        raise LeanVLMError(
            f"sample {b}: position {p} is needed for the loss (a supervised token or the one before it) "
            "but the method removed it; supervised tokens must follow text tokens"
        )
    return shift_labels.gather(1, state.orig).masked_fill(~real, IGNORE_INDEX)


def answer_queries(
    labels: torch.Tensor | None, shift_labels: torch.Tensor | None, b: int, n: int, device
) -> torch.Tensor | None:
    """[B, N] the token just before each answer span (PyramidDrop's training query): the first position
    of each run of positions that predict a supervised token (from ``shift_labels`` when given, as the
    loss). None without labels of this call's shape."""
    has_labels = labels is not None and labels.shape == (b, n)
    supervised = (labels.to(device) != IGNORE_INDEX) if has_labels else None  # each token is a target
    if shift_labels is not None and shift_labels.shape == (b, n):
        predicts = shift_labels.to(device) != IGNORE_INDEX  # each position predicts a target
        own = torch.zeros_like(predicts)
        own[:, 1:] = predicts[:, :-1]
        if has_labels:
            own[:, 0] = supervised[:, 0]
    elif has_labels:
        predicts = torch.zeros_like(supervised)
        predicts[:, :-1] = supervised[:, 1:]
        own = supervised
    else:
        return None
    return predicts & ~own
