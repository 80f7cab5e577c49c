from __future__ import annotations

from dataclasses import dataclass

from ..ops.diversity import max_min_select
from ..registry import register_method
from .prellm import PerImageSelection

#: distances are compared at this resolution: float noise below it (a vision tower run on a batch and on
#: one image differs by about 1e-8) does not change the selection (the reference's fp16 distances are
#: coarser still, about 2.4e-4)
RESOLUTION = 1e-5


@register_method("divprune")
@dataclass(frozen=True)
class DivPrune(PerImageSelection):
    """DivPrune: before the LLM, keep a diverse subset of each image's visual tokens (greedy max-min
    selection on the projected image features by cosine distance); training-free and text-agnostic.

    Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al.,
    CVPR 2025, arXiv 2503.02175). Reference code: https://github.com/vbdi/divprune

    Per image, of its N visual tokens, ``round(N * keep_ratio)`` (or ``keep_tokens``) are kept: first the
    most isolated token (largest cosine distance to its nearest neighbour), then repeatedly the token
    farthest (by its minimum distance) from those selected. The kept tokens keep their original order;
    text is untouched.

    Args:
        keep_ratio: share of each image's visual tokens kept, in (0, 1]. Default 0.098 (the reference's
            default: 56 of LLaVA-1.5's 576). No-op: 1.0.
        keep_tokens: keep this many visual tokens per image instead (1 up to the image's tokens).
        positions: "auto" (the reference: "compact", the shortened sequence numbered 0..n-1; "original"
            on M-RoPE models, whose (t, h, w) ids are kept, as the MMTok port), "original", "compact".

    Differences from the reference:
        - Features are the projected image features in the LLM's input space (as the reference), per
          image of every sample (the reference: batch row 0, one image, a hard-coded 35-token system
          prompt). LLaVA-NeXT: an image's whole packed sequence, newline tokens included (as the
          reference). Qwen-VL: the merger's outputs (the MMTok port uses pre-merger ViT features
          averaged per 2x2 group; ours stays in one feature space for every model).
        - Distances in float32, compared at a resolution of 1e-5 so that float noise does not decide
          (the reference computes in the embedding dtype, fp16 in its evaluation, where distances are
          coarser, about 2.4e-4); ties go to the earliest token, as the reference's argmax. A selected
          token is excluded explicitly (the reference relies on its self-distance being about 0, which
          can select a duplicate twice).
        - The last prompt token is never dropped (it is kept on top of the budget when it is visual).

    Its own cost (per image the Gram matrix, 2*N*N*D FLOPs, the norms and the greedy steps) is counted as
    "selection" in the reports built from the trace. The vision tower still runs in full.
    """

    keep_ratio: float = 0.098
    keep_tokens: int | None = None
    positions: str = "auto"

    def __post_init__(self):
        self._check_budget()

    def select(self, ctx, b, slots, features, k):
        chosen = max_min_select(features, k, resolution=RESOLUTION)
        return chosen, self.image_cost(*features.shape, len(chosen), 0)

    def image_cost(self, n, d, k, text):
        return 2 * n * n * d + 3 * n * d + 2 * k * n  # Gram, norms, greedy
