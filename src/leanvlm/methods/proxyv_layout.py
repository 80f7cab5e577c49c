"""Where ProxyV's grid tokens, proxies and query rows sit in one call (built once, at the start layer)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops.masks import proxy_mask
from .prellm import first_items


class _Layout:
    """Where one call's vision tokens, proxies and query rows are, and the split layers' mask."""


def build_layout(method, ctx) -> _Layout:
    """Per sample: the grid tokens (keys and values only), their proxies and the query rows, padded over
    the batch, and the split layers' mask."""
    s = ctx.state
    r = method.reduce_factor
    replicas = ctx.replicas
    inputs = (ctx.tower_inputs or ctx.vision_inputs) if replicas > 1 else ctx.vision_inputs
    per_image = ctx.image_slots()
    # each original sample's first image (generate() may repeat samples after the tower ran)
    starts = first_items([len(images) for images in per_image], replicas)
    samples = []
    for row, images in enumerate(per_image):
        sample = _Sample()
        for local, (image, slots) in enumerate(sorted(images.items())):
            number = image if replicas == 1 else starts[row] + local
            layout = ctx.adapter.visual_layout(inputs, number, len(slots))
            if layout is None:
                if method.proxy == "spatial":
                    raise ConfigError(
                        f"ProxyV(proxy='spatial'): the {len(slots)} visual tokens of image {local} of sample "
                        f"{row} do not form a grid that {type(ctx.adapter.model).__name__}'s layout describes "
                        "(after a reduction before the LLM, for instance); proxy='learned' needs no grid"
                    )
                layout = torch.tensor([(0, j, 0) for j in range(len(slots))]), [(len(slots), 1)]
            sample.add_image(method, r, slots, layout[0].tolist(), int(s.order[row, slots[0]]))
        samples.append(sample)
    return _assemble(method, s, samples)


class _Sample:
    """One sample's grid tokens and proxies while the layout is built."""

    def __init__(self):
        self.vis, self.cell, self.weight = [], [], []
        self.proxy_slot, self.proxy_order, self.groups, self.tiles = [], [], [], []

    def add_image(self, method, r: int, slots: list[int], cells: list, start_order: int) -> None:
        first = len(self.proxy_slot)
        on_grid = [
            (slot, cell) for slot, cell in zip(slots, cells, strict=True) if cell[0] >= 0
        ]  # newlines: queries
        count = 0
        if (
            method.proxy == "spatial"
        ):  # one proxy per r x r cell that holds a token, tile by tile, raster order
            keys = [(tile, y // r, x // r) for _, (tile, y, x) in on_grid]
            number = {key: first + k for k, key in enumerate(sorted(set(keys)))}
            count = len(number)
            for (slot, (_, y, x)), key in zip(on_grid, keys, strict=True):
                self.vis.append(slot)
                self.cell.append(number[key])
                self.weight.append(float(_central(y, r) and _central(x, r)))
        else:  # learned: every tile gets the same number of proxies
            members: dict[int, list[int]] = {}
            for slot, (tile, _, _) in on_grid:
                members.setdefault(tile, []).append(len(self.vis))
                self.vis.append(slot)
                self.cell.append(0)
                self.weight.append(0.0)
            for tile in sorted(members):
                self.groups.append((members[tile], first + count))
                self.tiles.append(len(members[tile]))
                count += method.learned_count
        self.proxy_slot += [slots[min(j, len(slots) - 1)] for j in range(count)]
        self.proxy_order += [start_order] * count


def _pad(rows: list[list], fill, dtype, device, width: int | None = None) -> torch.Tensor:
    width = max(1, max(map(len, rows))) if width is None else width
    return torch.tensor([[*row, *[fill] * (width - len(row))] for row in rows], dtype=dtype, device=device)


def _assemble(method, s, samples: list[_Sample]) -> _Layout:
    b, n = s.orig.shape
    dev = s.orig.device
    lay = _Layout()
    is_vis = torch.zeros(b, n, dtype=torch.bool)
    for row, sample in enumerate(samples):
        is_vis[row, sample.vis] = True
        totals: dict[int, float] = {}
        for c, w in zip(sample.cell, sample.weight, strict=True):
            totals[c] = totals.get(c, 0.0) + w
        if method.proxy == "spatial":  # a cell without central tokens averages the tokens it holds
            counts: dict[int, int] = {}
            for c in sample.cell:
                counts[c] = counts.get(c, 0) + 1
            sample.weight = [
                w / totals[c] if totals[c] else 1.0 / counts[c]
                for c, w in zip(sample.cell, sample.weight, strict=True)
            ]
    queries = [(~is_vis[row]).nonzero()[:, 0].tolist() for row in range(b)]
    lay.vis_slots = _pad([x.vis for x in samples], 0, torch.long, dev)
    lay.vis_valid = _pad([[True] * len(x.vis) for x in samples], False, torch.bool, dev)
    lay.cell = _pad([x.cell for x in samples], 0, torch.long, dev)
    lay.weight = _pad([x.weight for x in samples], 0.0, torch.float32, dev)
    lay.proxy_slot = _pad([x.proxy_slot for x in samples], 0, torch.long, dev)
    proxy_valid = _pad([[True] * len(x.proxy_slot) for x in samples], False, torch.bool, dev)
    proxy_order = _pad([x.proxy_order for x in samples], 0, torch.long, dev)
    query_slots = _pad(queries, 0, torch.long, dev)
    lay.query_valid = _pad([[True] * len(q) for q in queries], False, torch.bool, dev)
    lay.groups = [(row, torch.tensor(m, device=dev), f) for row, x in enumerate(samples) for m, f in x.groups]
    lay.vis_count = [len(x.vis) for x in samples]
    lay.proxy_count = [len(x.proxy_slot) for x in samples]
    lay.tile_sizes = [x.tiles for x in samples]
    lay.query_at = (lay.query_valid.nonzero()[:, 0], query_slots[lay.query_valid])
    lay.vis_at = (lay.vis_valid.nonzero()[:, 0], lay.vis_slots[lay.vis_valid])
    p = proxy_valid.shape[1]
    lay.queries = torch.cat([query_slots, n + torch.arange(p, device=dev).expand(b, p)], 1)
    lay.allowed = proxy_mask(
        s.order, s.valid, is_vis.to(dev), query_slots, lay.query_valid, proxy_order, proxy_valid
    )
    return lay


def _central(v: int, r: int) -> bool:
    """Whether offset ``v % r`` is one of the cell's central rows (what bilinear 1/r sampling reads)."""
    k = v % r
    return k in (r // 2 - 1, r // 2) if r % 2 == 0 else k == r // 2
