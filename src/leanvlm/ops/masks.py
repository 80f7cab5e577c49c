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


def proxy_mask(order, valid, is_vis, query_slots, query_valid, proxy_order, proxy_valid) -> torch.Tensor:
    """[B, Q + P, N + P] bool: which keys (the N sequence slots, then the P proxies) each query row (the
    Q sequence query slots, then the proxies) attends to in a split layer.

    Sequence queries see the real slots before them in causal ``order`` (as in the baseline) and no
    proxy; a proxy sees the real non-grid slots before its image's first slot (``proxy_order``) and the
    real proxies up to itself, never a grid token. A filler row (padding) sees only itself."""
    b, n = order.shape
    p = proxy_order.shape[1]
    q_order = order.gather(1, query_slots)
    main_main = valid[:, None, :] & (order[:, None, :] <= q_order[:, :, None])
    main_proxy = torch.zeros(b, query_slots.shape[1], p, dtype=torch.bool, device=order.device)
    proxy_main = (valid & ~is_vis)[:, None, :] & (order[:, None, :] < proxy_order[:, :, None])
    upto = torch.ones(p, p, dtype=torch.bool, device=order.device).tril()
    proxy_proxy = upto[None] & proxy_valid[:, None, :]
    allowed = torch.cat([torch.cat([main_main, main_proxy], 2), torch.cat([proxy_main, proxy_proxy], 2)], 1)
    own = torch.cat([query_slots, n + torch.arange(p, device=order.device).expand(b, p)], 1)
    real = torch.cat([query_valid & valid.gather(1, query_slots), proxy_valid], 1)
    self_only = torch.zeros_like(allowed).scatter_(2, own[..., None], True)
    return torch.where(real[..., None], allowed, self_only)
