"""Selection policy shared by the methods that rank visual tokens and keep the best (FastV, PyramidDrop)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine.edits import Keep
from ..ops import topk_keep


def keep_top_visual(
    ctx, scores: torch.Tensor, keep_count: Callable[[int], int], compact: bool, *, needs_query: bool = True
) -> Keep:
    """Keep the ``keep_count(N)`` best-scored visual tokens of each sample (N: its visual tokens in the
    input), text untouched, order preserved.

    The last prompt token is what generation continues from (and the usual query): it is never
    dropped, even when the prompt ends with an image, and counts against the budget when visual. In
    training, a sample without an answer span has no query row: it keeps everything (``needs_query``:
    the scores come from query rows)."""
    s = ctx.state
    candidates = s.visual  # visual and pooled slots (never inserted ones): what the budget counts
    last = ctx.last_prompt_slot()
    last_is_visual = candidates.gather(1, last.clamp_min(0))[:, 0]
    candidates = candidates & (s.slots != last)
    wanted = torch.tensor([keep_count(n) for n in ctx.visual_counts], device=scores.device)
    wanted = (wanted - last_is_visual.long()).clamp_min(0)
    if ctx.training and needs_query:
        wanted = torch.where(ctx.has_query, wanted, candidates.sum(-1))
    keep = topk_keep(scores, candidates, torch.minimum(wanted, candidates.sum(-1)))
    return Keep(keep, compact=compact)
