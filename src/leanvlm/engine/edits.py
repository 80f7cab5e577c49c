"""Generic edits a method hands the engine: what to do to the hidden states and the token state.

A method computes *which* tokens (its algorithm); the edit says *what happens* to them, the same way for
every method, so that masks, positions, KV records, the trace and FLOPs follow from the token state:

* :class:`Keep`: keep a subset of slots (order preserved);
* :class:`Merge`: merge groups of slots into their leader (the group mean);
* :class:`Insert`: insert new tokens (hidden states the method computed) after given slots.

Replacing the computation of whole layers is a plan item, :class:`leanvlm.engine.plan.Replace`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LeanVLMError
from ..ops import compact_indices
from .state import INSERTED, POOLED, TokenState, gather_positions, gather_rows

Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Keep:
    """Keep the slots where ``keep`` [B, n] is True. ``compact``: later tokens' RoPE positions are
    re-numbered over the dropped ones (else every kept token keeps its position). ``hidden`` [B, n, D]:
    the slots' new hidden states, computed by the method (e.g. a kept token that absorbed dropped ones);
    None keeps them."""

    keep: torch.Tensor
    compact: bool = False
    hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class Merge:
    """``leader`` [B, n]: the slot leading each slot's group (itself for slots that stay alone). Each
    group becomes one token at its leader's place, its hidden state the group mean. ``position``:
    "mean" (floor of the members' mean position id) or "first" (the leader's)."""

    leader: torch.Tensor
    position: str = "mean"


@dataclass(frozen=True)
class Insert:
    """New tokens: ``hidden`` [B, k, D] placed after the slots ``after`` [B, k] (-1: in front of the
    sequence; never after the last slot, where the output is read), in the given order; ``valid`` [B, k]
    False leaves a filler slot in front (a sample that inserts fewer). An inserted token takes the position id of the slot before it, and is not part of any
    loss; it sees what that slot sees plus the tokens inserted before it, and every later token sees it."""

    hidden: torch.Tensor
    after: torch.Tensor
    valid: torch.Tensor | None = None


def apply_edit(edit, hidden: torch.Tensor, state: TokenState, rotary: Rotary | None):
    """(hidden, state, changed) after ``edit``; ``rotary`` recomputes tables for new position ids (None
    before the first decoder layer, where the model computes them from the ids)."""
    if isinstance(edit, Keep):
        return _keep(edit, hidden, state, rotary)
    if isinstance(edit, Merge):
        return _merge(edit, hidden, state, rotary)
    if isinstance(edit, Insert):
        return _insert(edit, hidden, state)
    raise LeanVLMError(f"a plan step returned {type(edit).__name__}; expected Keep, Merge, Insert or None")


def _check(edit_name: str, tensor: torch.Tensor, shape, dtype=None) -> None:
    if tuple(tensor.shape) != tuple(shape) or (dtype is not None and tensor.dtype != dtype):
        raise LeanVLMError(
            f"{edit_name}: got a {tensor.dtype} tensor of shape {list(tensor.shape)}, expected "
            f"{dtype or 'a tensor'} of shape {list(shape)}"
        )


def _tables(rotary, hidden, pos, state):
    if rotary is None or state.cos is None:
        return None, None
    return rotary(hidden, pos)


def _keep(edit: Keep, hidden, s: TokenState, rotary):
    _check("Keep.keep", edit.keep, s.orig.shape, torch.bool)
    if edit.hidden is not None:
        _check("Keep.hidden", edit.hidden, hidden.shape)
        hidden = edit.hidden
    if not bool((s.valid & ~edit.keep).any()):
        return hidden, s, edit.hidden is not None  # nothing real dropped
    keep = edit.keep & s.valid  # padding and filler slots go too: compact_indices puts fillers in front
    index, present = compact_indices(keep)
    # compact positions: later tokens' ids are lowered by the input tokens dropped before them
    dropped = s.valid & ~keep & (s.kind != INSERTED)
    hidden = gather_rows(hidden, index)
    pos = gather_positions(s.pos, index)
    if edit.compact:
        pos = (pos - gather_positions(dropped.long().cumsum(-1), index)).masked_fill(~present, 0)
        cos, sin = _tables(rotary, hidden, pos, s)
    elif s.cos is not None:
        cos, sin = gather_rows(s.cos, index), gather_rows(s.sin, index)
    else:
        cos = sin = None
    shift = s.shift + dropped.sum(-1) if edit.compact else s.shift
    return hidden, s.select(index, present, pos=pos, cos=cos, sin=sin, shift=shift), True


def _merge(edit: Merge, hidden, s: TokenState, rotary):
    leader = edit.leader
    _check("Merge.leader", leader, s.orig.shape, torch.long)
    b, n, d = hidden.shape
    own = s.slots
    if bool((leader == own).all()):
        return hidden, s, False
    bad = (leader < 0) | (leader >= n)
    bad |= ~bad & (leader.clamp(0, n - 1).gather(1, leader.clamp(0, n - 1)) != leader)
    if bool(bad.any()):
        row, slot = (int(v) for v in bad.nonzero()[0])
        raise LeanVLMError(
            f"Merge.leader: sample {row}, slot {slot} points at {int(leader[row, slot])}; each slot must point "
            f"at a slot in [0, {n - 1}] that leads itself"
        )
    ones = torch.ones(b, n, 1, dtype=hidden.dtype, device=hidden.device)
    counts = torch.zeros_like(ones).scatter_add_(1, leader[..., None], ones)  # [B, n, 1]
    keep = leader == own
    index, present = compact_indices(keep)
    sums = torch.zeros_like(hidden).scatter_add_(1, leader[..., None].expand(-1, -1, d), hidden)
    hidden = gather_rows(sums / counts.clamp_min(1), index)
    if edit.position == "mean":
        pos = s.pos.float()
        lead = leader.expand(*pos.shape[:-2], b, n)
        pos_sum = torch.zeros_like(pos).scatter_add_(-1, lead, pos)
        pos = torch.floor(pos_sum / counts[..., 0].clamp_min(1)).long()
    elif edit.position == "first":
        pos = s.pos
    else:
        raise LeanVLMError(f"Merge.position={edit.position!r} is not 'mean' or 'first'")
    pos = gather_positions(pos, index)
    cos, sin = _tables(rotary, hidden, pos, s)
    new = s.select(index, present, pos=pos, cos=cos, sin=sin, shift=s.shift)
    grouped = gather_rows(counts, index)[..., 0] > 1
    new.kind = torch.where(grouped & present, POOLED, new.kind).to(s.kind.dtype)
    return hidden, new, True


def _insert(edit: Insert, hidden, s: TokenState):
    b, n, d = hidden.shape
    k = edit.after.shape[-1]
    _check("Insert.hidden", edit.hidden, (b, k, d))
    _check("Insert.after", edit.after, (b, k), torch.long)
    if k == 0:
        return hidden, s, False
    valid_new = (
        edit.valid if edit.valid is not None else torch.ones(b, k, dtype=torch.bool, device=hidden.device)
    )
    _check("Insert.valid", valid_new, (b, k), torch.bool)
    after = edit.after
    if bool(((after < -1) | (after >= n)).any()):
        raise LeanVLMError(f"Insert.after: slots must be in [-1, {n - 1}]")
    if bool((valid_new & (after == n - 1)).any()):
        # the last slot is where the model's output (the next-token logits) is read
        raise LeanVLMError("Insert.after: a token can not be inserted after the last slot of the sequence")
    after = torch.where(valid_new, after, -1)  # filler slots go in front, as everywhere
    # the combined sequence, sorted by (anchor slot, inserted after the anchor, rank among the inserted)
    own = s.slots
    key_old = own * (k + 1)
    key_new = after * (k + 1) + 1 + torch.arange(k, device=after.device)
    order = torch.argsort(torch.cat([key_old, key_new], -1), dim=-1, stable=True)  # [B, n + k]
    anchor = after.clamp_min(0)

    def combine(old, new):  # [B, n, ...] and [B, k, ...] -> sorted [B, n + k, ...]
        both = torch.cat([old, new], 1)
        idx = order.view(*order.shape, *([1] * (both.dim() - 2))).expand(-1, -1, *both.shape[2:])
        return both.gather(1, idx)

    def combine_pos(old):  # [..., B, n]: inserted tokens take their anchor's position ids
        new = gather_positions(old, anchor)
        both = torch.cat([old, new], -1)
        return both.gather(-1, order.expand(*both.shape[:-2], *order.shape))

    in_front = after < 0
    state = TokenState(
        orig=combine(s.orig, s.orig.gather(1, anchor)),
        base=combine(s.base, s.base.gather(1, anchor)),
        # the slots are in causal order: number them (inserting twice after one token stays strict)
        order=torch.arange(n + k, device=after.device).expand(b, n + k),
        valid=combine(s.valid, valid_new & (in_front | s.valid.gather(1, anchor))),
        kind=combine(s.kind, torch.full((b, k), INSERTED, dtype=s.kind.dtype, device=after.device)),
        pos=combine_pos(s.pos),
        cos=None if s.cos is None else combine(s.cos, gather_rows(s.cos, anchor)),
        sin=None if s.sin is None else combine(s.sin, gather_rows(s.sin, anchor)),
        shift=s.shift,
    )
    return combine(hidden, edit.hidden.to(hidden.dtype)), state, True
