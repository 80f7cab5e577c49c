"""Per-layer attention masks and positions for the surviving tokens (prefill and decode)."""

from __future__ import annotations

import torch

from .. import compat
from ..ops import build_bool_mask, gather_mask, to_layer_format
from ..ops.masks import mask_keys
from .state import KVMap, TokenState


def prefill_mask(mask, s: TokenState, attn_implementation: str, dtype: torch.dtype):
    """The mask a layer needs for the slots of ``s``, from the mask the model built for its layer-0
    sequence (``s.base`` indexes it): gathered where it can be (keeping every property of the model's
    mask), built fresh where tokens were inserted (the model's mask has no row for them)."""
    kind = compat.mask_kind(mask)
    inserted = bool(s.inserted.any())
    if kind == "none":
        if attn_implementation.startswith("flash"):
            # a mask, not None: flash attention without one reads the edited position ids (which skip
            # or repeat) as packed sequences
            return s.valid.long()
        if bool(s.valid.all()):
            return None  # causal over the slots, in order: the kernel's is_causal is right
        return to_layer_format(build_bool_mask(s.order, s.order, s.valid), attn_implementation, dtype)
    if kind == "padding":  # flash attention: causal by slot order, padding from the model's mask
        return mask_keys(gather_mask(mask, None, s.base), s.valid)
    if inserted:
        return to_layer_format(build_bool_mask(s.order, s.order, s.valid), attn_implementation, dtype)
    return mask_keys(gather_mask(mask, s.base, s.base), s.valid)


def extend_mask(mask, new_orig, new_valid, m: KVMap, attn_implementation: str, dtype, *, fresh: bool):
    """The mask of new tokens over one stage's cache entries plus themselves. ``fresh``: the model's mask
    is not in original coordinates (its layer 0 was shortened), so build it from the entries' record."""
    k_orig = torch.cat([m.orig, new_orig], -1)
    k_valid = torch.cat([m.valid, new_valid], -1)
    kind = compat.mask_kind(mask)
    if kind == "none" or fresh:
        if kind == "none" and new_orig.shape[1] == 1 and bool(k_valid.all()):
            return None
        return to_layer_format(build_bool_mask(new_orig, k_orig, k_valid), attn_implementation, dtype)
    return mask_keys(gather_mask(mask, None, k_orig), k_valid)


def layer_position_ids(given, pos: torch.Tensor, base: torch.Tensor):
    """The ``position_ids`` keyword a layer gets: ``pos`` in the form the model passed (models that pass
    none keep passing none; Qwen-VL passes a text row, gathered by the slots' layer-0 index)."""
    if given is None:
        return None
    if given.dim() == pos.dim():
        return pos
    return given.expand(base.shape[0], given.shape[-1]).gather(-1, base)


def next_positions(next_pos: torch.Tensor, valid: torch.Tensor, rows: int) -> torch.Tensor:
    """Position ids of new tokens continuing a sequence whose next position is ``next_pos`` [B]:
    [B, n] (``rows`` 0) or [rows, B, n] (M-RoPE: text continues on every row alike)."""
    pos = next_pos[:, None] + valid.long().cumsum(-1) - 1
    pos = pos.clamp_min(0)
    return pos.expand(rows, *pos.shape) if rows else pos
