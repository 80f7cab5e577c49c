"""Density-peak clustering (pure tensor functions), as SparseVLM's token recycling uses it."""

from __future__ import annotations

import torch


def dpc_knn(x: torch.Tensor, clusters: int, k: int) -> torch.Tensor:
    """Assign the rows of ``x`` [n, D] to ``clusters`` clusters by density-peak clustering with k nearest
    neighbours (DPC-kNN, as TCFormer and SparseVLM):

    - distances ``cdist(x, x) / sqrt(D)``;
    - density ``exp(-mean of the squared distances to the k nearest rows``, the row itself included);
    - each row's distance to the nearest row of strictly higher density (the densest: the largest
      distance of all);
    - centres: the ``clusters`` rows with the largest ``distance * density`` (ties to the lowest index);
    - every row joins its nearest centre (ties to the first centre), a centre its own cluster.

    Returns [n] cluster ids in 0..clusters-1, numbered in the order of the centres' rows. The reference
    adds random noise (1e-6) to the densities to break ties; ties here go by index, so the result is
    deterministic."""
    n = x.shape[0]
    clusters = max(1, min(int(clusters), n))
    x = x.float()
    dist = torch.cdist(x, x) / x.shape[-1] ** 0.5
    nearest = torch.topk(dist, min(max(1, int(k)), n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    higher = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_higher = torch.where(higher, dist, dist.max()).min(-1).values
    score = to_higher * density
    centres = torch.sort(torch.sort(score, descending=True, stable=True).indices[:clusters]).values
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(clusters, device=x.device)
    return assign
