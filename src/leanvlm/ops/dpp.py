"""Determinantal point process selection (pure tensor functions): CDPruner's conditional kernel and the
fast greedy MAP inference of Chen et al. (NeurIPS 2018)."""

from __future__ import annotations

import torch

#: a candidate whose remaining gain (the Schur complement d_n^2) is at or below this share of the
#: largest diagonal entry is spent: the chosen set already spans it (rank-deficient or duplicate
#: features); float32 leaves rounding noise of about 1e-7 there
SPENT = 1e-5


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a row of zeros stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def relevance(features: torch.Tensor, text: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """[N] CDPruner's instruction relevance of each row of ``features`` [N, D] to the text rows [M, D]:
    the mean cosine similarity over the text rows (negated with ``negate``, as the reference's code on
    CLIP embeddings), min-max normalised to (0, 1] with the reference's 1e-6 offset. Equal similarities
    (range 0, where the reference divides by zero) give 1 everywhere: relevance does not decide."""
    sim = unit_rows(features) @ unit_rows(text).T  # [N, M]
    raw = sim.mean(-1)
    if negate:
        raw = -raw
    lo, hi = raw.min(), raw.max()
    if float(hi - lo) <= 0:
        return torch.ones_like(raw)
    return (raw - lo + 1e-6) / (hi - lo)


def conditional_kernel(features: torch.Tensor, rel: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """[N, N] ``L = diag(r) S diag(r)``, ``S`` the cosine similarity of the rows of ``features``. With
    ``theta`` in (0, 1), ``r`` is first mapped to ``exp(alpha r)``, ``alpha = theta / (2 (1 - theta))``
    (the relevance/diversity trade-off the reference ships commented out); None: linear ``r`` (the
    reference's released code)."""
    unit = unit_rows(features)
    sim = unit @ unit.T
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel[:, None] * sim * rel[None, :]


def dpp_greedy(kernel: torch.Tensor, k: int, resolution: float = 0.0) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``kernel`` [N, N] (symmetric PSD): ``k`` items, each step
    the one that most increases ``log det L_Y``, by the incremental Cholesky update (O(k^2 N)). Ties go
    to the lowest index. When every remaining candidate's gain is spent (at most :data:`SPENT` times the
    largest diagonal entry: the chosen set spans the rest), the rest are taken in order of their own diagonal ``L_nn`` (ties to the lowest
    index), so the result always has ``k`` distinct items (the reference's update goes NaN there and
    returns fewer). Returns the selected indices, sorted ascending."""
    n = kernel.shape[0]
    k = max(0, min(int(k), n))
    if k == n:
        return torch.arange(n, device=kernel.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    gain = kernel.diagonal().clone()  # d_n^2: det(L_{Y+n}) / det(L_Y)
    spent = SPENT * float(gain.max()) if n else 0.0
    factors = kernel.new_zeros(k, n)  # rows of the incremental Cholesky factor
    for i in range(k):
        open_gain = gain.masked_fill(chosen, float("-inf"))
        best = float(open_gain.max())
        if best <= spent:
            rest = kernel.diagonal().masked_fill(chosen, float("-inf"))
            order = torch.sort(rest, descending=True, stable=True).indices[: k - i]
            chosen[order] = True
            break
        j = int(torch.nonzero(open_gain >= best * (1 - resolution))[0, 0])  # the first of the ties
        chosen[j] = True
        e = (kernel[j] - factors[:i, j] @ factors[:i]) / gain[j].sqrt()
        factors[i] = e
        gain = (gain - e * e).clamp_min(0)
    return chosen.nonzero()[:, 0]
