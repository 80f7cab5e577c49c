"""CrossGET's trainable parts: the per-layer offsets of the image cross token (in the vision tower) and of
the text cross token (in the LLM), both zero-initialised as in the reference (sdc17/CrossGET)."""

from __future__ import annotations

import torch
from torch import nn


class CrossGETModules(nn.Module):
    """``cross_image[i]`` is added to the image cross token before vision encoder layer i, ``cross_text[l]``
    to the first token of each sample before decoder layer l (prefill only)."""

    def __init__(self, vision_layers: int, vision_hidden: int, text_layers: int, text_hidden: int):
        super().__init__()
        self.cross_image = nn.Parameter(torch.zeros(vision_layers, vision_hidden))
        self.cross_text = nn.Parameter(torch.zeros(text_layers, text_hidden))


def symmetric_kl(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``(KL(p || m) + KL(q || m)) / 2`` with p, q the softmax over the last dimension
    of ``image`` and ``text`` and m their mean (a Jensen-Shannon divergence), in float32."""
    p = torch.softmax(image.float(), -1)
    q = torch.softmax(text.float(), -1)
    m = (p + q) / 2
    log_m = m.clamp_min(1e-30).log()
    kl_p = (p * (p.clamp_min(1e-30).log() - log_m)).sum(-1)
    kl_q = (q * (q.clamp_min(1e-30).log() - log_m)).sum(-1)
    return ((kl_p + kl_q) / 2).mean()
