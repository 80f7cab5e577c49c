from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .. import compat
from ..engine import Replace
from ..engine.stack import split_layer
from ..engine.state import gather_rows
from ..errors import ConfigError, show
from ..modules import modules_for
from ..modules.proxyv import GuidedUpdate, ProxyVModules, inner_size, learned_flops
from ..registry import register_method
from .base import Method
from .proxyv_layout import build_layout

PROXIES = ("spatial", "learned")


@register_method("proxyv")
@dataclass(frozen=True)
class ProxyV(Method):
    """ProxyV: from decoder layer ``start_layer`` on, full vision tokens are no longer queries and skip
    the FFN; a few proxy tokens per tile carry that compute, and a small per-layer MLP updates every
    full token from its own state and its proxy's output. Full tokens still give keys and values, so
    text attends to every visual token at every layer: nothing is dropped. Prefill only: decoding runs
    the stock layers over a cache of the baseline's length (no proxy entry is cached).

    Paper: "Streamline Without Sacrifice: Squeeze out Computation Redundancy in LMM" (Wu et al., ICML
    2025, arXiv 2505.15816). Reference code: https://github.com/penghao-wu/ProxyV

    ProxyV adds trainable modules (``lv.prepare(model, method)`` creates them; ``leanvlm train --method
    proxyv`` trains them). **Untrained, its output is not meaningful**: the update MLPs start from a
    random init, as in the reference, which trains them with the model.

    Args:
        start_layer: the first decoder layer computed the ProxyV way, in [1, L]; L (the number of
            layers) is the no-op. Default 12 (the reference's Vicuna-7B setting; 16 for its larger LLMs).
        reduce_factor: per-axis downsampling of each tile's grid into proxies (4: 24x24 -> 6x6).
        proxy: "spatial" (bilinear downsampling of each tile's grid; the default) or "learned" (per
            tile, learnable queries attend over its tokens; the transposed attention spreads the proxy
            outputs back; needs no grid).
        learned_proxies: proxies per tile with ``proxy="learned"`` (default 576 / reduce_factor^2, the
            reference's count for a 24x24 tile).

    Masks (layers >= start_layer): queries are the proxies, LLaVA-NeXT's row newlines and the text;
    keys and values come from every token; proxies see text before their image and earlier proxies
    (never full vision tokens); text and newlines see what they see in the baseline, never a proxy.
    Positions stay the original ones; proxies take the positions of their image's first visual slots.

    Differences from the reference:
        - The sequence stays in the model's own order (the reference packs [vision; newlines; text]
          and orders by position ids; the masks are the same). Several images per sample, and batches
          whose samples have different tile counts, work (the reference pads every sample to a fixed
          crop count and has one image per sample).
        - Stock LLaVA-NeXT checkpoints un-pad their tiles and close each row with a newline (the
          reference's own layout keeps full tiles and one newline per tile): each tile is its own
          grid, partial where un-padding cut it; newlines are queries, as text. Qwen2-VL / Qwen2.5-VL:
          each image or video frame's merged grid.
        - Spatial proxies average the central tokens of each r x r cell: exactly the reference's
          bilinear downsampling (align_corners=False) where r divides the grid's sides (tested); a
          partial cell averages the central tokens it holds, or all of its tokens when it holds none of
          them. Proxies are numbered tile by tile, each tile's cells in raster order.
        - Learned proxies: one set of queries shared by every tile, as the reference.
        - Attention runs through sdpa with a boolean mask (eager softmax when the model runs eager;
          models loaded with flash attention use sdpa in these layers); no attention dropout.
    """

    start_layer: int = 12
    reduce_factor: int = 4
    proxy: str = "spatial"
    learned_proxies: int | None = None

    trainable = True
    changes_length = False

    def __post_init__(self):
        for field in ("start_layer", "reduce_factor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ProxyV: {field}={show(value)} must be an integer >= 1")
        self._check_choice("proxy", self.proxy, PROXIES)
        if self.learned_proxies is not None:
            if self.proxy != "learned":
                raise ConfigError(
                    f"ProxyV: learned_proxies={show(self.learned_proxies)} is for proxy='learned' (proxy={self.proxy!r})"
                )
            n = self.learned_proxies
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"ProxyV: learned_proxies={show(n)} must be an integer >= 1")

    @property
    def is_noop(self) -> bool:
        return False  # the no-op is start_layer == the model's depth (checked against the model)

    def noop_on(self, num_layers: int) -> bool:
        return self.start_layer >= num_layers  # no layer is computed the ProxyV way: no modules needed

    @property
    def learned_count(self) -> int:
        if self.proxy != "learned":
            return 0
        return self.learned_proxies or max(1, 576 // self.reduce_factor**2)

    def check_model(self, num_layers: int) -> None:
        if not 1 <= self.start_layer <= num_layers:
            raise ConfigError(
                f"ProxyV: start_layer={self.start_layer} is outside [1, {num_layers}] for this model "
                f"({num_layers} decoder layers; {num_layers} is the no-op)"
            )

    def check_adapter(self, adapter) -> None:
        for i in range(self.start_layer, adapter.num_layers):
            adapter.layer_parts(i)  # raises, naming what, on layers that can not be split

    def module_key(self) -> str:
        kind = f"learned{self.learned_count}" if self.proxy == "learned" else "spatial"
        return f"ProxyV-{self.start_layer}-r{self.reduce_factor}-{kind}"

    def build_modules(self, adapter):
        text = adapter.text_config
        layers = max(0, adapter.num_layers - self.start_layer)
        return ProxyVModules(text.hidden_size, text.rms_norm_eps, layers, self.learned_count)

    def plan(self, adapter) -> list:
        if self.start_layer >= adapter.num_layers:
            return []
        modules = modules_for(adapter.model, self)
        return [Replace(self.start_layer, adapter.num_layers, _Runner(self, adapter, modules).run)]

    # --- FLOPs -----------------------------------------------------------------------------------------
    def proxies_for(self, tokens: int) -> int:
        """Proxies of a square tile of ``tokens`` (what the schedule assumes; the trace counts real ones)."""
        if self.proxy == "learned":
            return self.learned_count
        side = math.isqrt(tokens)
        if side * side != tokens:
            return math.ceil(tokens / self.reduce_factor**2)
        return math.ceil(side / self.reduce_factor) ** 2

    def module_flops(self, hidden: int, vision: int, proxies: int, first: bool, tiles: list[int]) -> int:
        """FLOPs of the method's own modules in one layer (the initializer at the start layer)."""
        flops = GuidedUpdate.flops(hidden, vision, proxies)
        if self.proxy == "learned":
            flops += 2 * vision * self.learned_count * inner_size(hidden)  # spreading the context back
            if first:
                flops += sum(learned_flops(hidden, n, self.learned_count) for n in tiles)
        return flops

    def layer_work(self, shape, images: list[int]) -> list[tuple[int, int, int]] | None:
        t = shape.text
        vision, proxies = sum(images), sum(self.proxies_for(n) for n in images if n)
        out = []
        for layer in range(t.num_layers):
            if layer < self.start_layer or not vision:
                out.append((0, 0, 0))
                continue
            flops = self.module_flops(t.hidden, vision, proxies, layer == self.start_layer, images)
            out.append((vision, proxies, flops))
        return out

    @classmethod
    def bench_default(cls, num_layers: int) -> Method:
        return cls(start_layer=max(1, round(num_layers * 12 / 32)))

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> Method:
        raise ConfigError("ProxyV keeps every visual token: it has no token budget (choose start_layer)")


class _Runner:
    """Computes layers start_layer .. L-1 of a prefill the ProxyV way (stock layers when decoding)."""

    def __init__(self, method: ProxyV, adapter, modules: ProxyVModules):
        self.method, self.adapter, self.modules = method, adapter, modules

    def run(self, ctx, layer_idx, layer, hidden, call_layer):
        update = self.modules.updates[layer_idx - self.method.start_layer]
        if ctx.decoding:
            return call_layer(hidden)
        if "proxyv_visual" not in ctx.shared:
            ctx.shared["proxyv_visual"] = bool(ctx.state.visual.any())
        if not ctx.shared["proxyv_visual"]:
            out = call_layer(hidden)
            if torch.is_grad_enabled():  # every module takes part in the graph (data parallelism expects it)
                out = out + 0 * sum(p.sum() for p in update.parameters()).to(out.dtype)
            return out
        lay = ctx.shared.get("proxyv")
        if lay is None:
            lay = ctx.shared["proxyv"] = build_layout(self.method, ctx)
            lay.proxies = self._initial_proxies(lay, hidden)
        parts = self.adapter.layer_parts(layer_idx)
        cos = torch.cat([ctx.state.cos, gather_rows(ctx.state.cos, lay.proxy_slot)], 1)
        sin = torch.cat([ctx.state.sin, gather_rows(ctx.state.sin, lay.proxy_slot)], 1)
        n = hidden.shape[1]
        m = lay.queries.shape[1] - lay.proxies.shape[1]

        def compute(hidden, proxies, cache):
            tokens = torch.cat([hidden, proxies.to(hidden.dtype)], 1)
            eager = self.adapter.attn_implementation == "eager"
            out = split_layer(
                parts,
                tokens,
                lay.queries,
                cos,
                sin,
                lay.allowed,
                eager=eager,
                cache=cache,
                cache_tokens=n,
                layer_idx=layer_idx,
            )
            proxies = out[:, m:]
            vision = update(
                gather_rows(hidden, lay.vis_slots), self._context(lay, update.context_proj(proxies))
            )
            new = hidden.index_put(lay.query_at, out[:, :m][lay.query_valid])
            return new.index_put(lay.vis_at, vision[lay.vis_valid]), proxies

        if compat.checkpointing_active(layer) and ctx.cache is None:
            # activation checkpointing (the layer's own is bypassed: the layer is computed by hand)
            new, lay.proxies = checkpoint(compute, hidden, lay.proxies, None, use_reentrant=False)
        else:
            new, lay.proxies = compute(hidden, lay.proxies, ctx.cache)
        first = layer_idx == self.method.start_layer
        d = hidden.shape[-1]
        flops = [
            self.method.module_flops(d, v, p, first, tiles)
            for v, p, tiles in zip(lay.vis_count, lay.proxy_count, lay.tile_sizes, strict=True)
        ]
        ctx.record_layer_work(lay.vis_count, lay.proxy_count, flops)
        return new

    def _initial_proxies(self, lay, hidden):
        vision = gather_rows(hidden, lay.vis_slots)  # [B, V, D]
        b, _, d = vision.shape
        if self.method.proxy == "spatial":
            weighted = vision * lay.weight[..., None].to(vision.dtype)
            out = torch.zeros(b, lay.proxy_slot.shape[1], d, dtype=vision.dtype, device=vision.device)
            return out.scatter_add(1, lay.cell[..., None].expand(-1, -1, d), weighted)
        init = self.modules.initializer
        parts, spreads = [], []
        for row, members, first in lay.groups:
            proxies, spread = init(vision[row, members])
            parts.append((row, first, proxies))
            spreads.append(spread)
        lay.spreads = spreads
        out = torch.zeros(b, lay.proxy_slot.shape[1], d, dtype=vision.dtype, device=vision.device)
        rows = torch.cat([torch.full((len(p),), r, dtype=torch.long, device=out.device) for r, _, p in parts])
        cols = torch.cat([torch.arange(f, f + len(p), device=out.device) for _, f, p in parts])
        return out.index_put((rows, cols), torch.cat([p for _, _, p in parts]))

    def _context(self, lay, projected):
        if self.method.proxy == "spatial":
            return gather_rows(projected, lay.cell)
        rows, cols, values = [], [], []
        n = self.method.learned_count
        for (row, members, first), spread in zip(lay.groups, lay.spreads, strict=True):
            values.append(spread.to(projected.dtype) @ projected[row, first : first + n])
            rows.append(torch.full((len(members),), row, dtype=torch.long, device=projected.device))
            cols.append(members)
        out = projected.new_zeros(*lay.vis_slots.shape, projected.shape[-1])
        index = (torch.cat(rows), torch.cat(cols))
        return out.index_put(index, torch.cat(values))
