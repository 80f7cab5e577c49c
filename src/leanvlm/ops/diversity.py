"""Diversity-based token selection (pure tensor functions)."""

from __future__ import annotations

import torch


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, N] ``1 - cos`` between rows (rows of zero norm are at distance 1 from everything)."""
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return 1 - unit @ unit.T


def max_min_select(x: torch.Tensor, k: int, resolution: float = 0.0) -> torch.Tensor:
    """Greedy max-min (farthest-point) selection of ``k`` of the rows of ``x`` [N, D] by cosine distance,
    as DivPrune: first the most isolated row (largest distance to its nearest neighbour), then each step
    the row farthest from everything selected so far. Ties go to the lowest index; a selected row is
    never selected again (duplicates included). ``resolution`` > 0 rounds distances to that step first,
    so that differences below it (float noise) are ties. Returns the selected indices, sorted ascending."""
    n = x.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    if k == n:
        return torch.arange(n, device=x.device)
    dist = cosine_distances(x)
    if resolution > 0:
        dist = torch.round(dist / resolution) * resolution
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, float("inf")).min(dim=1).values  # distance to the nearest other row
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    first = int(torch.argmax(nearest))
    chosen[first] = True
    mind = dist[first].clone()
    for _ in range(k - 1):
        j = int(torch.argmax(mind.masked_fill(chosen, float("-inf"))))
        chosen[j] = True
        mind = torch.minimum(mind, dist[j])
    return chosen.nonzero()[:, 0]
