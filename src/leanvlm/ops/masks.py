"""Per-layer attention masks after tokens were removed.

The model builds one mask for its full-length sequence (layer 0). Layers after a reduction see a
subset of queries and keys, so their mask is gathered from that one: rows by the surviving queries,
columns by the surviving keys. This keeps every property of the model's own mask (causality,
padding) in the original coordinates. Masks come in the formats transformers uses:
4-D bool (sdpa; True = attend), 4-D float (eager; 0 or the dtype's minimum), 2-D padding masks
(flash attention; 1 = attend), or None.
"""

import torch


def _batch_index(index: torch.Tensor, batch: int) -> torch.Tensor:
    return index.expand(batch, -1) if index.shape[0] != batch else index


def gather_mask(mask, q_index: torch.Tensor | None, k_index: torch.Tensor):
    """Select rows ``q_index`` [B, Q] (None keeps all rows) and columns ``k_index`` [B, K] of ``mask``."""
    if mask is None:
        return None
    if mask.dim() == 2:  # [B, K0] padding mask
        return mask.gather(1, _batch_index(k_index, mask.shape[0]))
    b = k_index.shape[0]
    mask = mask.expand(b, -1, -1, -1)  # [B, 1, Q0, K0]
    if q_index is not None:
        rows = q_index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
        mask = mask.gather(2, rows)
    cols = k_index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
    return mask.gather(3, cols)


def mask_keys(mask, k_valid: torch.Tensor):
    """Hide keys where ``k_valid`` [B, K] is False."""
    if mask.dim() == 2:
        return mask * k_valid.to(mask.dtype)
    if mask.dtype == torch.bool:
        return mask & k_valid[:, None, None, :]
    return mask.masked_fill(~k_valid[:, None, None, :], torch.finfo(mask.dtype).min)


def build_bool_mask(q_orig: torch.Tensor, k_orig: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """Causal mask in original coordinates: query q sees key k iff k is valid and came no later.

    q_orig: [B, Q], k_orig: [B, K] original sequence indices; k_valid: [B, K]. Returns [B, 1, Q, K].
    """
    return (k_valid[:, None, :] & (k_orig[:, None, :] <= q_orig[:, :, None]))[:, None]


def to_layer_format(bool_mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """Convert a 4-D bool mask into what ``attn_implementation`` expects."""
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=bool_mask.device)
        return torch.where(bool_mask, zero, torch.finfo(dtype).min)
    if attn_implementation.startswith("flash"):
        return bool_mask[:, 0, -1, :].long()
    return bool_mask
