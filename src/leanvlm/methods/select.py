"""Selection policy shared by the methods that rank visual tokens and keep the best (FastV, PyramidDrop)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..engine.edits import Keep
from ..ops import topk_keep


def keep_top_visual(
    ctx,
    scores: torch.Tensor,
    keep_count: Callable[[int], int],
    compact: bool,
    *,
    needs_query: bool = True,
    owner: str | None = None,
) -> Keep:
    """Keep the ``keep_count(N)`` best-scored visual tokens of each sample (N: its visual tokens in the
    input), text untouched, order preserved.

    The last prompt token is what generation continues from (and the usual query): it is never
    dropped, even when the prompt ends with an image, and counts against the budget when visual. In
    training, a sample without an answer span has no query row: it keeps everything (``needs_query``:
    the scores come from query rows). Given an ``owner`` (the method's name), a sample of which it keeps
    no visual token at all is warned about: the model sees no image from this layer on."""
    s = ctx.state
    candidates = s.visual  # visual and pooled slots (never inserted ones): what the budget counts
    last = ctx.last_prompt_slot()
    last_is_visual = candidates.gather(1, last.clamp_min(0))[:, 0]
    candidates = candidates & (s.slots != last)
    counts = [keep_count(n) for n in ctx.visual_counts]
    if owner is not None and any(n > 0 and k <= 0 for n, k in zip(ctx.visual_counts, counts, strict=True)):
        # a prompt that ends with an image keeps that token all the same (it is the query)
        ends_visual = last_is_visual.tolist()
        emptied = [(n, k) for n, k, e in zip(ctx.visual_counts, counts, ends_visual, strict=True) if not e]
        warn_if_none_kept(owner, ctx.layer, [n for n, _ in emptied], [k for _, k in emptied])
    wanted = torch.tensor(counts, device=scores.device)
    wanted = (wanted - last_is_visual.long()).clamp_min(0)
    if ctx.training and needs_query:
        wanted = torch.where(ctx.has_query, wanted, candidates.sum(-1))
    keep = topk_keep(scores, candidates, torch.minimum(wanted, candidates.sum(-1)))
    return Keep(keep, compact=compact)


def warn_if_none_kept(owner: str, layer: int, visual: list[int], kept: list[int]) -> None:
    """A warning when a sample with visual tokens keeps none of them (a ratio below 1/N rounds down to 0,
    or ``keep_tokens=0``); once per distinct message, as Python shows warnings."""
    emptied = sorted({n for n, k in zip(visual, kept, strict=True) if n > 0 and k <= 0})
    if emptied:
        warnings.warn(
            f"{owner} keeps none of the {' / '.join(map(str, emptied))} visual tokens from layer {layer} on: "
            "the model sees no image after that; raise keep_ratio (int(N * keep_ratio) tokens are kept) "
            "or keep_tokens",
            stacklevel=2,
        )
