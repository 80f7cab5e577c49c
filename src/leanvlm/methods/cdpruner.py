from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, check_range
from ..ops.dpp import conditional_kernel, dpp_greedy, relevance
from ..registry import register_method
from .prellm import PerImageSelection

#: gains within this share of the best one are ties (lowest index first): float noise (a vision tower run
#: on a batch and on one image differs by about 1e-8) does not change the selection
RESOLUTION = 1e-5

#: which text tokens the relevance is computed against
TEXTS = ("instruction", "prompt")


@register_method("cdpruner")
@dataclass(frozen=True)
class CDPruner(PerImageSelection):
    """CDPruner: before the LLM, keep each image's visual tokens that a conditional determinantal point
    process picks: diverse (cosine similarity of the projected image features) and relevant to the
    instruction; training-free.

    Paper: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
    (Zhang et al., NeurIPS 2025,
    arXiv 2506.10967). Reference code: https://github.com/Theia-4869/CDPruner

    Per image with N visual tokens and projected features f (the LLM's input space):
    ``S = cos(f_i, f_j)``; relevance ``r_n`` = mean cosine similarity of f_n to the instruction's text
    embeddings, min-max normalised as the reference (values in (0, 1 + 1e-6 / range]); kernel ``L = diag(r) S diag(r)``; ``keep`` tokens chosen by
    greedy MAP inference (each step the token that most increases ``log det L_Y``, by the incremental
    Cholesky update). The kept tokens keep their order; text is untouched.

    Args:
        keep_ratio: share of each image's visual tokens kept, in (0, 1]. Default 0.1111 (64 of
            LLaVA-1.5's 576, the reference's headline setting). No-op: 1.0.
        keep_tokens: keep this many visual tokens per image instead (1 up to the image's tokens).
        text: which text embeddings the relevance uses: "instruction" (the prompt's text tokens after the
            sample's last image; all of its text tokens when none follow it) or "prompt" (every text
            token of the prompt).
        negate: negate the similarity before normalising, as the reference's code does on CLIP
            embeddings (the most relevant token is then the one least similar to the question).
        theta: None (linear relevance, the reference's released code) or a value in (0, 1): relevance
            mapped to ``exp(alpha r)``, ``alpha = theta / (2 (1 - theta))`` (the trade-off the reference
            ships commented out).
        positions: "auto" (the reference: "compact", the shortened sequence numbered 0..n-1; "original"
            on M-RoPE models, whose (t, h, w) ids are kept), "original", "compact".

    Differences from the reference (ours, labelled as such):
        - **Relevance source.** The reference embeds the raw question with CLIP's text tower and compares
          it with the CLIP-space patch embeddings (layer -2, ``post_layernorm`` and
          ``visual_projection``), which exist only for CLIP-ViT LLaVA models and need a second model
          loaded. Ours compares the projected image features with the LLM's own input embeddings of the
          instruction's tokens (both in the LLM's input space), the same on every model (Qwen-VL has no
          CLIP text tower; the reference's Qwen2.5-VL code is unreleased). The instruction is read from
          the prompt: the text after the last image, chat-template tokens included.
        - **Sign.** The reference negates the CLIP similarity (a CLIP-specific effect, per its
          maintainer). In the LLM's embedding space we use the paper's sign (``negate=False``); the
          reference's is ``negate=True``.
        - **Scope.** Per image of every sample (the reference: batch 1, one question, min-max over the
          whole batch). LLaVA-NeXT: the image's whole packed sequence, newline tokens included, with a
          ratio budget (the reference: a count per crop, newlines always kept).
        - **Numerical safety.** Float32; gains within 1e-5 of the best one (relative) are ties, taken in
          token order, so that float noise does not decide (the reference takes the exact argmax); when every remaining token's gain is spent (duplicate or
          rank-deficient features) the rest are taken by their own kernel diagonal, so exactly the
          budget is kept (the reference's update goes NaN there and keeps fewer). A relevance range of 0
          gives constant relevance (the reference divides by zero).
        - The last prompt token is never dropped (it is kept on top of the budget when it is visual).

    Its own cost (per image the similarity Gram matrix, the relevance, the kernel and the greedy
    updates) is counted as "selection" in the reports built from the trace. The vision tower still runs
    in full.
    """

    keep_ratio: float = 0.1111
    keep_tokens: int | None = None
    text: str = "instruction"
    negate: bool = False
    theta: float | None = None
    positions: str = "auto"

    def __post_init__(self):
        self._check_budget()
        self._check_choice("text", self.text, TEXTS)
        if not isinstance(self.negate, bool):
            raise ConfigError(f"CDPruner: negate={self.negate!r} must be True or False")
        if self.theta is not None:
            check_range("CDPruner", "theta", self.theta, 0, 1, low_open=True, high_open=True)

    def text_slots(self, ctx, b: int) -> torch.Tensor:
        """Slots of sample ``b`` whose input embeddings the relevance is computed against."""
        text = ctx.instruction() if self.text == "instruction" else ctx.in_prompt & ~ctx.state.visual
        return text[b].nonzero()[:, 0]

    def select(self, ctx, b, slots, features, k):
        n, d = features.shape
        text = ctx.hidden[b, self.text_slots(ctx, b)].detach().float()
        # an image-only prompt: relevance does not decide
        rel = features.new_ones(n) if len(text) == 0 else relevance(features, text, negate=self.negate)
        kernel = conditional_kernel(features, rel, self.theta)
        chosen = dpp_greedy(kernel, k, resolution=RESOLUTION)
        return chosen, self.image_cost(n, d, k, len(text))

    def image_cost(self, n, d, k, text):
        # norms, Gram, relevance (text norms and N x M similarities), kernel scaling, greedy updates
        return 3 * n * d + 2 * n * n * d + 3 * text * d + 2 * n * text * d + 2 * n * n + 2 * k * k * n
