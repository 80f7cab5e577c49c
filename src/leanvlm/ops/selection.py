import torch


def topk_keep(scores: torch.Tensor, candidates: torch.Tensor, keep_counts: torch.Tensor) -> torch.Tensor:
    """Which tokens survive: every non-candidate, plus the ``keep_counts[b]`` best-scored candidates.

    scores: [B, N]; candidates: [B, N] bool (the tokens that may be dropped); keep_counts: [B] long.
    Ties go to the earlier token. Returns a [B, N] bool keep mask (original order is untouched).
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)  # [B, N]
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank of each token by score
    return ~candidates | (rank < keep_counts[:, None])


def compact_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a [B, N] keep mask into gather indices, order preserved, left-padded to a common length.

    Returns (index [B, M], present [B, M]) with M = max kept count; ``present`` is False for the filler
    slots put in front of samples that keep fewer tokens (they gather index 0 and must be masked).
    """
    counts = keep.sum(-1)  # [B]
    m = int(counts.max()) if keep.numel() else 0
    b = keep.shape[0]
    offset = m - counts  # [B] filler slots in front
    dest = offset[:, None] + keep.long().cumsum(-1) - 1  # [B, N] slot of each kept token
    index = torch.zeros(b, m, dtype=torch.long, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    index[rows, dest[rows, cols]] = cols
    present = torch.arange(m, device=keep.device)[None, :] >= offset[:, None]
    return index, present
