"""The token set a decoder layer sees, and what each stage's KV cache holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def expand_positions(position_ids: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """Position ids as [..., B, n] (1-D RoPE: [B, n]; M-RoPE: [R, B, n])."""
    if position_ids is None:
        position_ids = torch.arange(n, device=device)[None]
    return position_ids.expand(*position_ids.shape[:-2], batch, n)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, n, D], index: [B, m] -> [B, m, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def gather_positions(pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pos: [..., B, n], index: [B, m] -> [..., B, m]."""
    return pos.gather(-1, index.expand(*pos.shape[:-2], *index.shape))


@dataclass
class TokenState:
    """What the current layer sees, per slot of the (possibly reduced) sequence.

    orig:    [B, n] index of the slot's token in the call's input sequence
    valid:   [B, n] a real token (False for the model's padding and for filler slots added in front of
             samples that keep fewer tokens than others)
    visual:  [B, n] a visual token (implies valid)
    pos:     [..., B, n] RoPE position ids the layer uses (original or compacted)
    cos/sin: [B, n, Dh] rotary tables for ``pos``
    shift:   [B] real tokens dropped so far (compact positions of later tokens are original - shift)
    """

    orig: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    shift: torch.Tensor

    def select(self, index: torch.Tensor, present: torch.Tensor, *, pos, cos, sin, shift) -> TokenState:
        """The state of the slots ``index`` [B, m] (``present`` False for filler slots)."""
        return TokenState(
            orig=self.orig.gather(1, index),
            valid=self.valid.gather(1, index) & present,
            visual=self.visual.gather(1, index) & present,
            pos=pos,
            cos=cos,
            sin=sin,
            shift=shift,
        )


@dataclass
class KVMap:
    """What the KV cache of one stage's layers holds: original index and validity of every entry."""

    orig: torch.Tensor  # [B, K]
    valid: torch.Tensor  # [B, K]
    shift: torch.Tensor  # [B]
