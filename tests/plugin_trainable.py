"""A test-only method with trainable parts: ``count`` learned tokens inserted before each sample's first
visual token at ``layer`` (the kind of ProxyV's proxies or CrossGET's cross token)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanvlm.engine import Insert, Step
from leanvlm.methods.base import Method, check_layer
from leanvlm.modules import modules_for


class Tokens(nn.Module):
    def __init__(self, count: int, hidden: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(count, hidden) * 0.5)


@dataclass(frozen=True)
class LearnedTokens(Method):
    layer: int = 1
    count: int = 2
    trainable = True

    def check_model(self, num_layers: int) -> None:
        check_layer("LearnedTokens", "layer", self.layer, num_layers)

    @property
    def is_noop(self) -> bool:
        return self.count == 0

    def build_modules(self, adapter):
        return Tokens(self.count, adapter.text_config.hidden_size)

    def plan(self, adapter):
        tokens = modules_for(adapter.model, self).tokens

        def insert(ctx):
            s = ctx.state
            vis = s.visual
            b = vis.shape[0]
            first = torch.where(vis, s.slots, s.slots.shape[1]).min(-1).values
            after = (first - 1).clamp(-1, s.slots.shape[1] - 1)[:, None].expand(b, self.count).contiguous()
            valid = vis.any(-1)[:, None].expand(b, self.count).contiguous()
            return Insert(tokens[None].expand(b, -1, -1).to(ctx.hidden.dtype), after, valid)

        return [Step(self.layer, insert)]

    def visual_schedule(self, num_layers, images):
        return [sum(images)] * num_layers

    def extra_tokens(self, num_layers, images):
        return [0] * self.layer + [self.count if sum(images) else 0] * (num_layers - self.layer)
