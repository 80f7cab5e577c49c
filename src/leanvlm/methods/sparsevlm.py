from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.edits import Keep, Merge
from ..engine.plan import Step
from ..errors import ConfigError, check_range, is_int, show
from ..ops import compact_indices
from ..ops.cluster import dpc_knn
from ..registry import register_method
from .base import POSITIONS, Method
from .select import keep_top_visual

#: v1.5's visual tokens kept after each pruning layer, per ``RETAIN_TOKN`` (for LLaVA-1.5's 576)
V15_BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
REFERENCE_VISUAL = 576


def recycled(pruned: int) -> tuple[int, int]:
    """(tokens recycled, clusters they merge into) of ``pruned`` tokens: the reference's top 30% + 1,
    into one cluster per 10 + 1."""
    if pruned <= 0:
        return 0, 0
    r = min(pruned, int(pruned * 0.3) + 1)
    return r, min(r, r // 10 + 1)


@register_method("sparsevlm")
@dataclass(frozen=True)
class SparseVLM(Method):
    """SparseVLM: inside the LLM, text "raters" (the instruction tokens most related to the image) rank
    the visual tokens by their attention at a few layers; each stage keeps a budget and recycles part of
    what it prunes into a few merged tokens. Training-free, text-guided.

    Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang
    et al., ICML 2025, arXiv 2410.04417). Reference code: https://github.com/Gumpest/SparseVLMs. We
    follow v1.5 (the main branch's default: pruning after layers 2 / 6 / 15, its budget table, token
    recycling), with v2's original position ids by default.

    1. Raters, once per prefill, on the LLM's input embeddings: for the instruction's text tokens T
       (after the sample's last image; all of its text when none follows) and its visual tokens V,
       ``R = mean over V of softmax over T of (V T^T)``; the raters are the text tokens with ``R`` above
       its mean.
    2. At each pruning layer l, every visual token's score is the attention the raters give it at l,
       from l's own q/k and RoPE, softmax over every key a rater sees (causal), averaged over heads and
       raters (one row per rater: no full attention matrix). Layer l runs on every token; layer l+1 is
       the first to see the reduced set.
    3. The stage keeps its budget of best-scored visual tokens. Of the pruned ones, the top 30% + 1 by
       score are recycled: density-peak clustered (DPC-kNN) into ``n // 10 + 1`` clusters, each merged
       into one token (the members' mean), which later stages may prune again.

    Args:
        keep_tokens: 192, 128, 96 or 64: the reference's v1.5 budgets after each pruning layer for that
            setting (300 / 200 / 110 at 192), scaled by N / 576 for a sample with N visual tokens.
            Default 192.
        keep_ratio: instead, the share of visual tokens kept on average over the layers (clusters
            aside), with the 192 setting's stage shape: matched budgets against other methods.
        layers: the pruning layers (layer l runs on everything; from l+1 on the stage's budget).
        recycle: merge part of the pruned tokens into clusters (v1 / v1.5); False: v2.
        positions: "auto" (original ids kept, as v2), "original", "compact" (the shortened sequence
            numbered 0..n-1, as v1 / v1.5; 1-D RoPE only).

    Differences from the reference:
        - Per sample in any batch, with left padding, several images (ranked together, as one visual
          span) and every adapter (the reference: batch 1, LLaVA-1.5).
        - Rater attention is computed from q/k rows over the full key range for the rater rows only, so
          any attention kernel runs the layers (the reference materialises full attention in every layer
          and asserts SDPA).
        - A recycled cluster sits at the place of its earliest member, as one merged visual token with
          the floor of its members' mean position (the reference inserts the clusters after the kept
          visual tokens and renumbers positions).
        - Clustering ties go by index (the reference adds random noise to the densities).
        - The last prompt token is never dropped (kept on top of the budget when it is visual).
        - Stage budgets come from the table (v1.5); v1's rank-adaptive budgets are not built.
    """

    keep_tokens: int | None = 192
    keep_ratio: float | None = None
    layers: tuple[int, ...] = (2, 6, 15)
    recycle: bool = True
    positions: str = "auto"

    query = "text"  # FLOPs: rankings counted with every text token as a query row (raters are a subset)

    def __post_init__(self):
        if self.keep_ratio is not None:
            check_range("SparseVLM", "keep_ratio", self.keep_ratio, 0, 1, low_open=True)
            if is_int(self.keep_tokens) and self.keep_tokens == 192:  # the default: keep_ratio replaces it
                object.__setattr__(self, "keep_tokens", None)
            if self.keep_tokens is not None:
                raise ConfigError(
                    f"SparseVLM: give keep_tokens={show(self.keep_tokens)} or keep_ratio={self.keep_ratio}, not both"
                )
        elif not is_int(self.keep_tokens) or self.keep_tokens not in V15_BUDGETS:
            raise ConfigError(
                f"SparseVLM: keep_tokens={show(self.keep_tokens)} is not one of the reference's settings "
                f"{', '.join(map(str, V15_BUDGETS))} (or give keep_ratio)"
            )
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else self.layers
        if (
            not isinstance(layers, tuple)
            or not layers
            or not all(is_int(x) and x >= 0 for x in layers)
            or list(layers) != sorted(set(layers))
        ):
            raise ConfigError(f"SparseVLM: layers={show(self.layers)} must be increasing ints >= 0")
        object.__setattr__(self, "layers", layers)
        if self.keep_tokens is not None and len(layers) != 3:
            raise ConfigError(
                f"SparseVLM: layers={show(self.layers)} has {len(layers)} stages; keep_tokens={self.keep_tokens} "
                "is a table of 3 (give keep_ratio for another number of stages)"
            )
        if not isinstance(self.recycle, bool):
            raise ConfigError(f"SparseVLM: recycle={self.recycle!r} must be True or False")
        self._check_choice("positions", self.positions, POSITIONS)

    def check_model(self, num_layers: int) -> None:
        if self.layers[-1] > num_layers - 2:
            raise ConfigError(
                f"SparseVLM: layers={show(self.layers)} has layer {self.layers[-1]}, outside [0, {num_layers - 2}] "
                f"for this model ({num_layers} decoder layers: a pruning layer needs one after it)"
            )
        if self.keep_ratio is not None:
            self._shares(num_layers)  # raises when the budget can not be met

    @property
    def is_noop(self) -> bool:
        return self.keep_ratio == 1.0

    # --- budgets -------------------------------------------------------------------------------------
    def _shares(self, num_layers: int) -> list[float]:
        """Share of N each stage keeps."""
        if self.keep_tokens is not None:
            return [c / REFERENCE_VISUAL for c in V15_BUDGETS[self.keep_tokens]]
        base = [c / REFERENCE_VISUAL for c in V15_BUDGETS[192]]
        base = (base + [base[-1]] * len(self.layers))[: len(self.layers)]
        spans = [b - a for a, b in zip(self.layers, [*self.layers[1:], num_layers - 1], strict=True)]
        before = self.layers[0] + 1

        def average(f: float) -> float:
            return (
                before + sum(min(1.0, f * s) * span for s, span in zip(base, spans, strict=True))
            ) / num_layers

        if not before / num_layers < self.keep_ratio <= 1:
            raise ConfigError(
                f"SparseVLM: keep_ratio={self.keep_ratio} is outside ({before / num_layers:.3g}, 1] with the first "
                f"pruning after layer {self.layers[0]} of {num_layers}"
            )
        low, high = 0.0, 1.0 / min(base)
        for _ in range(60):  # the layer average grows with f
            mid = (low + high) / 2
            low, high = (mid, high) if average(mid) < self.keep_ratio else (low, mid)
        return [min(1.0, high * s) for s in base]

    def stage_counts(self, n: int, num_layers: int) -> list[int]:
        """Visual tokens each stage keeps of a sample with ``n`` (clusters aside), at least one."""
        return [max(1, min(n, int(round(share * n)))) for share in self._shares(num_layers)]

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        n = sum(images)
        out, current = [], n
        bounds = [*(layer + 1 for layer in self.layers), num_layers]
        out += [n] * bounds[0]
        for i, keep in enumerate(self.stage_counts(n, num_layers) if n else [0] * len(self.layers)):
            keep = min(keep, current)
            clusters = recycled(current - keep)[1] if self.recycle else 0
            current = keep + clusters
            out += [current] * (bounds[i + 1] - bounds[i])
        return out

    def scoring_layers(self, num_layers: int) -> list[int]:
        return list(self.layers)

    @staticmethod
    def scaled_layers(num_layers: int) -> tuple[int, ...]:
        """The reference's pruning layers (2, 6, 15 of 32) at the same depths of a model with
        ``num_layers`` (themselves from 17 layers on)."""
        if num_layers >= 17:
            return (2, 6, 15)
        layers = tuple(sorted({min(num_layers - 2, round(x * num_layers / 32)) for x in (2, 6, 15)}))
        if len(layers) != 3:
            raise ConfigError(
                f"SparseVLM: a model of {num_layers} decoder layers is too shallow for 3 stages"
            )
        return layers

    @classmethod
    def bench_default(cls, num_layers: int) -> SparseVLM:
        return cls(layers=cls.scaled_layers(num_layers))

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> SparseVLM:
        method = cls(keep_tokens=None, keep_ratio=budget, layers=cls.scaled_layers(num_layers))
        method.check_model(num_layers)
        return method

    # --- the algorithm ---------------------------------------------------------------------------------
    def plan(self, adapter) -> list[Step]:
        compact = self.resolved_positions(adapter.supports_compact_positions) == "compact"
        num_layers = adapter.num_layers
        steps = [Step(self.layers[0] + 1, lambda ctx: None, observe=self._raters, observe_layer=0)]
        for i, layer in enumerate(self.layers):
            steps.append(
                Step(
                    layer + 1,
                    lambda ctx, i=i: self._prune(ctx, i, num_layers, compact),
                    observe=self._scores,
                    observe_layer=layer,
                )
            )
        return steps

    def _raters(self, ctx):
        """At the LLM's input: each sample's raters, kept in input coordinates for later layers."""
        s, hidden = ctx.state, ctx.hidden.detach().float()
        text = ctx.instruction()
        raters = torch.zeros_like(text)
        for b in range(hidden.shape[0]):
            t, v = text[b].nonzero()[:, 0], s.visual[b].nonzero()[:, 0]
            if len(t) == 0 or len(v) == 0:
                continue
            relation = torch.softmax(hidden[b, v] @ hidden[b, t].T, -1).mean(0)  # [T]
            raters[b, t] = relation > relation.mean()
            if not raters[b, t].any():  # all equal: every instruction token rates
                raters[b, t] = True
        cost = 2 * (s.visual.sum(-1) * text.sum(-1)) * hidden.shape[-1]
        ctx.add_cost("SparseVLM raters", cost.cpu())
        ctx.shared["sparsevlm_raters"] = ctx.to_tokens(raters.long()).bool()

    def _scores(self, ctx) -> torch.Tensor:
        """At a pruning layer's input: the attention the raters give every slot."""
        raters = ctx.from_tokens(ctx.shared["sparsevlm_raters"].long()).bool() & ctx.state.valid
        return ctx.attention_from(*compact_indices(raters))

    def _prune(self, ctx, stage: int, num_layers: int, compact: bool):
        s, scores = ctx.state, ctx.observed

        def budget(n: int) -> int:
            return self.stage_counts(n, num_layers)[stage] if n else 0

        kept = keep_top_visual(ctx, scores, budget, compact).keep
        if not self.recycle:
            return Keep(kept, compact=compact)
        pruned = s.visual & ~kept & s.valid
        leader = s.slots.clone()
        heads = torch.zeros_like(kept)  # each cluster's token (its earliest member)
        cost = torch.zeros(s.orig.shape[0], dtype=torch.long)
        for b in range(s.orig.shape[0]):
            candidates = pruned[b].nonzero()[:, 0]
            r, c = recycled(len(candidates))
            if r == 0:
                continue
            order = torch.sort(scores[b, candidates], descending=True, stable=True).indices[:r]
            members = torch.sort(candidates[order]).values
            groups = dpc_knn(ctx.hidden[b, members].detach(), c, c)
            for g in range(c):
                slots = members[groups == g]
                leader[b, slots] = slots[0]  # the cluster sits at its earliest member
                heads[b, slots[0]] = True
            d = ctx.hidden.shape[-1]
            cost[b] = 3 * r * r * d + r * d  # distances (and the mean), as FLOPs
        ctx.add_cost("SparseVLM recycling", cost)
        survivors = ctx.to_tokens(kept | heads)  # in input coordinates: a merged token keeps its head's

        def drop(after):  # on the merged state: keep the kept tokens and the clusters' tokens
            t = after.state
            return Keep(~t.visual | survivors.gather(1, t.orig), compact=compact)

        return [Merge(leader, position="mean"), drop]
