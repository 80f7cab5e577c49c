"""Drive a decoder layer by hand: a layer whose queries are a subset of its keys (ProxyV's layers after
its start layer), computed from the adapter's :class:`leanvlm.adapters.base.LayerParts`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import compat
from ..ops import apply_rope
from .state import gather_rows


def split_layer(
    parts,
    hidden: torch.Tensor,
    queries: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    allowed: torch.Tensor,
    *,
    eager: bool = False,
    cache=None,
    cache_tokens: int = 0,
    layer_idx: int = 0,
) -> torch.Tensor:
    """One pre-norm decoder layer where only the rows ``queries`` are queries (and go through o_proj and
    the MLP) while every token of ``hidden`` gives keys and values.

    hidden: [B, K, D] every token's input; queries: [B, Q] indices into K; cos / sin: [B, K, Dh] every
    token's rotary tables; allowed: [B, Q, K] bool, which keys each query row attends to (every row must
    allow at least one key). ``cache``: the keys and values of the first ``cache_tokens`` tokens are
    appended to layer ``layer_idx`` of it (what later forwards read), as the layer itself would.
    ``eager``: softmax in float32 by hand (a reference for checks); otherwise sdpa with a boolean mask.
    Returns the query rows' outputs [B, Q, D]."""
    b, k_len, _ = hidden.shape
    n_q = queries.shape[1]
    hd = parts.head_dim
    x = parts.input_norm(hidden)
    q = parts.q_proj(gather_rows(x, queries)).view(b, n_q, -1, hd)
    k = parts.k_proj(x).view(b, k_len, -1, hd)
    v = parts.v_proj(x).view(b, k_len, -1, hd).transpose(1, 2)
    if parts.q_norm is not None:
        q, k = parts.q_norm(q), parts.k_norm(k)
    q = apply_rope(q.transpose(1, 2), gather_rows(cos, queries), gather_rows(sin, queries))
    k = apply_rope(k.transpose(1, 2), cos, sin)
    if cache is not None:
        compat.cache_write(cache, k[:, :, :cache_tokens], v[:, :, :cache_tokens], layer_idx)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if eager:
        logits = torch.matmul(q, k.transpose(-1, -2)).float() * parts.scaling
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.matmul(torch.softmax(logits, dim=-1).to(v.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=parts.scaling)
    out = parts.o_proj(out.transpose(1, 2).reshape(b, n_q, -1))
    h = gather_rows(hidden, queries) + out
    return h + parts.mlp(parts.post_norm(h))
