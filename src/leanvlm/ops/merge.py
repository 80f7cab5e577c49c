"""Token merging inside a transformer: complete-graph soft matching (CrossGET) and the importance-weighted
ensemble of matched tokens with size tracking. Pure tensor functions; batched (every sequence merges the
same number of tokens)."""

from __future__ import annotations

import torch


def complete_graph_match(
    metric: torch.Tensor, importance: torch.Tensor, r: int, protected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose ``r`` source tokens per sequence and the token each merges into.

    metric [B, N, C] (e.g. head-mean keys), importance [B, N], protected [N] bool (never a source nor a
    destination: CLS, the cross token). On the cosine-similarity graph of all tokens (no self edges):
    tokens are ranked by their best similarity, most redundant first; a token may pair only with tokens
    ranked after it (the triangular mask, so that two mutually best tokens do not both become sources);
    ``score = importance - best masked similarity``; the ``r`` lowest scores are sources, each merging
    into its most similar non-source token (unmasked similarity). A token ranked last and protected tokens
    are never sources.

    Returns (src [B, r], dst [B, r], keep [B, N - r]): source indices, their destinations (indices into
    the full sequence), and the tokens that stay, in their original order."""
    b, n, _ = metric.shape
    x = metric.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = x @ x.transpose(1, 2)  # [B, N, N]
    blocked = torch.eye(n, dtype=torch.bool, device=sim.device) | protected[None, :] | protected[:, None]
    sim = sim.masked_fill(blocked, float("-inf"))
    best = sim.max(-1).values  # [B, N]
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=sim.device).expand(b, n))
    later = rank[:, None, :] > rank[:, :, None]  # [B, i, j]: j ranked after i
    masked = sim.masked_fill(~later, float("-inf"))
    score = importance.float() - masked.max(-1).values  # -inf best (last ranked, protected) -> +inf
    score = score.masked_fill(protected[None, :], float("inf"))
    by_score = score.argsort(dim=-1, stable=True)
    src = by_score[:, :r]
    keep = by_score[:, r:].sort(-1).values
    candidates = sim.gather(1, src[..., None].expand(-1, -1, n))  # [B, r, N]
    is_src = torch.zeros(b, n, dtype=torch.bool, device=sim.device).scatter_(1, src, True)
    candidates = candidates.masked_fill(is_src[:, None, :] | protected[None, None, :], float("-inf"))
    dst = candidates.argmax(-1)
    return src, dst, keep


def ensemble_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    importance: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each source into its destination, weighted by the softmax of the pair's importances (times
    2, so that the weights sum to 2 as in the reference), on size-weighted features; sizes add up.

    x [B, N, D], size [B, N], importance [B, N]; src / dst [B, r]; keep [B, N - r] (ascending). Per
    source s into d: ``X[d] += w_s * X[s] + (w_d - 1) * X[d]`` with X = x * size (X[d] before any
    update), then x = X / size. Returns (x [B, N - r, D], size [B, N - r]) of the kept tokens in order."""
    d = x.shape[-1]
    weights = torch.softmax(
        torch.stack([importance.gather(1, src), importance.gather(1, dst)], -1).float(), -1
    )
    w_src, w_dst = (2 * weights).unbind(-1)
    big = x * size[..., None].to(x.dtype)
    src_x = big.gather(1, src[..., None].expand(-1, -1, d))
    dst_x = big.gather(1, dst[..., None].expand(-1, -1, d))
    add = w_src[..., None].to(x.dtype) * src_x + (w_dst[..., None].to(x.dtype) - 1) * dst_x
    big = big.scatter_add(1, dst[..., None].expand(-1, -1, d), add)
    size = size.scatter_add(1, dst, size.gather(1, src))
    kept = big.gather(1, keep[..., None].expand(-1, -1, d))
    new_size = size.gather(1, keep)
    return kept / new_size[..., None].to(x.dtype), new_size
