"""Attention of a few query rows to every key, without materialising the full attention matrix.

This is what lets FastV and PyramidDrop rank tokens under sdpa / flash attention, which return no
attention weights: the caller projects the chosen query rows and all keys with the layer's own
weights and RoPE, and these functions do the softmax.
"""

import torch


def attention_to_keys(
    q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Softmax attention of query rows to all keys, averaged over heads.

    q: [B, H, Q, D] (RoPE applied), k: [B, H_kv, N, D] (RoPE applied; H is a multiple of H_kv, as in
    grouped-query attention where query head h reads key head h // (H / H_kv)).
    visible: [B, Q, N] bool, which keys each query row may attend to (causal + padding).
    Returns [B, Q, N] float32; the softmax runs over the whole key range, in float32.
    """
    b, h, nq, d = q.shape
    h_kv = k.shape[1]
    groups = h // h_kv
    q = q.reshape(b, h_kv, groups * nq, d)  # [B, H_kv, G*Q, D]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # [B, H_kv, G*Q, N]
    logits = logits.view(b, h_kv, groups, nq, -1)
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # rows with no visible key -> 0
    return probs.mean(dim=(1, 2))  # [B, Q, N]


def mean_query_scores(probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """Average [B, Q, N] attention rows with per-row weights [B, Q] (0 for padding rows) -> [B, N]."""
    w = query_weight.to(probs.dtype)
    return (probs * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
