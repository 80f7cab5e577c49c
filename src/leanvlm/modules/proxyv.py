"""ProxyV's trainable parts: one guided-update MLP per layer from the start layer on, and (for learned
proxies) the proxy initializer. Shapes and initialisation follow the reference (penghao-wu/ProxyV,
``vision_mlp.py``); the code is ours."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, weight initialised to ones (LLaMA's)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def inner_size(hidden: int) -> int:
    """The update MLP's width: hidden / 4 from 1024 on, hidden / 2 below (as the reference computes it)."""
    return hidden // 4 if hidden >= 1024 else hidden // 2


class GuidedUpdate(nn.Module):
    """Updates full vision tokens from their own state and their proxy's layer output:
    ``norm(v + fc2(silu(fc1([input_proj(v), context]))))`` with ``context`` the context projection of
    the proxy output, taken to every token (spatial: the proxy whose cell holds it; learned: spread by
    the transposed attention). All linear maps without bias, default init; the norm's weight is 1."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        inner = inner_size(hidden)
        self.input_proj = nn.Linear(hidden, inner, bias=False)
        self.context_proj = nn.Linear(hidden, inner, bias=False)
        self.fc1 = nn.Linear(2 * inner, inner, bias=False)
        self.fc2 = nn.Linear(inner, hidden, bias=False)
        self.norm = RMSNorm(hidden, eps)

    def forward(self, vision: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """vision [..., n, D]; context [..., n, inner] (already projected by ``context_proj``)."""
        z = self.fc2(nn.functional.silu(self.fc1(torch.cat([self.input_proj(vision), context], -1))))
        return self.norm(vision + z)

    @staticmethod
    def flops(hidden: int, vision: int, proxies: int) -> int:
        """FLOPs (2 per multiply-add) of one layer's update of ``vision`` tokens from ``proxies``."""
        i = inner_size(hidden)
        return 2 * vision * (hidden * i + 2 * i * i + i * hidden) + 2 * proxies * hidden * i


class LearnedProxies(nn.Module):
    """Non-spatial proxies: ``count`` learnable queries (shared by every tile) attend over a tile's full
    tokens through a key projection to hidden / 4; the proxies are the softmax-weighted sums of the
    tokens, and the softmax over proxies of the transposed logits spreads proxy outputs back."""

    def __init__(self, hidden: int, count: int):
        super().__init__()
        self.key_dim = hidden // 4
        self.queries = nn.Parameter(torch.randn(count, self.key_dim) / (4 * self.key_dim) ** 0.5)
        self.key_proj = nn.Linear(hidden, self.key_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [n, D] of one tile -> (proxies [count, D], spread [n, count])."""
        logits = self.queries @ self.key_proj(tokens).transpose(0, 1) / self.key_dim**0.5  # [count, n]
        proxies = torch.softmax(logits.float(), -1).to(tokens.dtype) @ tokens
        spread = torch.softmax(logits.transpose(0, 1).float(), -1).to(tokens.dtype)
        return proxies, spread


def learned_flops(hidden: int, tokens: int, count: int) -> int:
    """FLOPs of making ``count`` learned proxies from a tile of ``tokens``: keys, logits, weighted sum."""
    key_dim = hidden // 4
    return 2 * tokens * hidden * key_dim + 2 * count * tokens * key_dim + 2 * count * tokens * hidden


class ProxyVModules(nn.Module):
    """Everything ProxyV trains for one base model: ``updates[l - start]`` for every layer l >= start,
    and ``initializer`` for learned proxies."""

    def __init__(self, hidden: int, eps: float, layers: int, learned: int = 0):
        super().__init__()
        self.updates = nn.ModuleList(GuidedUpdate(hidden, eps) for _ in range(layers))
        self.initializer = LearnedProxies(hidden, learned) if learned else None
