import dataclasses

import torch

from .. import compat
from ..errors import UnsupportedModelError
from ..flops import ModelShape
from ..registry import register_adapter
from .llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes. Each image is a base view plus
    high-resolution tiles, unpadded, with an ``image_newline`` token closing every row of the tile
    grid, so the number of visual tokens varies per image and per sample.

    All placeholder positions count as visual tokens, newline tokens included: they can be dropped
    like any other, as PyramidDrop's reference code does on LLaVA-NeXT."""

    name = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    @classmethod
    def model_shape(cls, config) -> ModelShape:
        return dataclasses.replace(super().model_shape(config), visual_tokens_per_image=0)  # AnyRes: varies

    def image_token_counts(self, vision_inputs) -> list[int] | None:
        """Base view + unpadded tiles + one newline per row of the tile grid, per image (AnyRes)."""
        sizes = vision_inputs.get("image_sizes")
        if sizes is None:
            return None
        cfg = self.model.config
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        base = side * side + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        counts = []
        for height, width in sizes.tolist():
            best_h, best_w = compat.anyres_canvas((height, width), cfg.image_grid_pinpoints)
            rows, cols = side * (best_h // tile), side * (best_w // tile)
            if width / height > cols / rows:  # wider than the tile grid: rows of padding are removed
                rows -= (rows - int(round(height * (cols / width), 7))) // 2 * 2
            else:
                cols -= (cols - int(round(width * (rows / height), 7))) // 2 * 2
            counts.append(base + rows * cols + rows)
        return counts

    def vision_sequences(self, inputs, sample: int = 0) -> list[int]:
        cfg = self.model.config
        v = cfg.vision_config
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        if inputs["input_ids"].shape[0] != 1:
            # images are not attributed to samples in the inputs (adjacent images share one placeholder run)
            raise UnsupportedModelError("vision FLOPs of LLaVA-NeXT inputs are counted for batch size 1")
        crops = [
            compat.anyres_crops(size, cfg.image_grid_pinpoints, v.image_size)
            for size in inputs["image_sizes"].tolist()
        ]
        return [tokens] * sum(crops)

    def _packing(self, height: int, width: int) -> tuple[list[tuple[int, int]], int]:
        """One image's packed tokens as (tile, patch) pairs (tile 0: the base view; (-1, -1): a row
        newline), the base view first, then the unpadded grid of the high-resolution tiles row by row;
        and how many tiles the tower ran for it."""
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: vision_feature_select_strategy="
                f"{cfg.vision_feature_select_strategy!r}; AnyRes packing needs 'default'"
            )
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        canvas_h, canvas_w = compat.anyres_canvas((height, width), cfg.image_grid_pinpoints)
        tiles_h, tiles_w = canvas_h // tile, canvas_w // tile
        rows, cols = range(side * tiles_h), range(side * tiles_w)
        if width / height > len(cols) / len(rows):  # wider: rows of padding above and below go
            pad = (len(rows) - int(round(height * (len(cols) / width), 7))) // 2
            rows = rows[pad : len(rows) - pad]
        else:
            pad = (len(cols) - int(round(width * (len(rows) / height), 7))) // 2
            cols = cols[pad : len(cols) - pad]
        pairs = [(0, p) for p in range(side * side)]
        for r in rows:
            for c in cols:
                pairs.append((1 + (r // side) * tiles_w + c // side, (r % side) * side + c % side))
            pairs.append((-1, -1))
        return pairs, 1 + tiles_h * tiles_w

    def feature_sources(self, vision_inputs: dict, sequences: int) -> list[torch.Tensor]:
        """Base view first (its tile in raster order), then the unpadded grid of the high-resolution tiles
        row by row, each row closed by a newline token (-1, -1), as the model packs them."""
        out, first = [], 0
        for height, width in vision_inputs["image_sizes"].tolist():
            pairs, tiles = self._packing(height, width)
            out.append(torch.tensor([(first + t, 1 + p) if t >= 0 else (-1, -1) for t, p in pairs]))
            first += tiles
        if first != sequences:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: image_sizes give {first} tiles but the vision tower ran {sequences}"
            )
        return out

    def visual_layout(self, vision_inputs: dict, image: int, n: int):
        """Each tile on its own grid (the base view, then every high-resolution tile, partial where
        un-padding cut it); row newlines are on no grid."""
        sizes = vision_inputs.get("image_sizes")
        if sizes is None or image >= len(sizes):
            return None
        pairs, tiles = self._packing(*sizes[image].tolist())
        if len(pairs) != n:
            return None
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        cells = [(t, p // side, p % side) if t >= 0 else (-1, -1, -1) for t, p in pairs]
        return torch.tensor(cells), [(side, side)] * tiles

    fixed_grid = None  # AnyRes: every image has its own layout

    def _drawn_layout(self, vision_inputs: dict, image: int):
        """(panels, cells, crop, (tiles_h, tiles_w)) of image ``image``: the base view, and the high-resolution
        tiles stitched into one picture cut to the un-padded cells ``crop`` = (row0, row1, col0, col1)
        of the tile canvas's grid; row newlines end the row before them."""
        from ..viz import Panel

        cfg = self.model.config
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        height, width = vision_inputs["image_sizes"][image].tolist()
        canvas_h, canvas_w = compat.anyres_canvas((height, width), cfg.image_grid_pinpoints)
        tiles_h, tiles_w = canvas_h // tile, canvas_w // tile
        n = len(self._packing(height, width)[0])
        cells, _ = self.visual_layout(vision_inputs, image, n)
        t, r, c = cells.unbind(-1)
        hi = t > 0
        rows = torch.where(hi, (t - 1) // tiles_w * side + r, -1)
        cols = torch.where(hi, (t - 1) % tiles_w * side + c, -1)
        r0, r1 = int(rows[hi].min()), int(rows[hi].max()) + 1
        c0, c1 = int(cols[hi].min()), int(cols[hi].max()) + 1
        out, last_row = [], 0
        for ti, ri, ci, row, col in zip(*(v.tolist() for v in (t, r, c, rows, cols)), strict=True):
            if ti == 0:
                out.append((0, ri, ci))
            elif ti > 0:
                out.append((1, row - r0, col - c0))
                last_row = row - r0
            else:  # a row newline closes the row before it
                out.append((1, last_row, -1))
        panels = [
            Panel("base view", side, side),
            Panel(
                "high-res tiles",
                r1 - r0,
                c1 - c0,
                tile_rows=tuple(k * side - r0 for k in range(1, tiles_h) if r0 < k * side < r1),
                tile_cols=tuple(k * side - c0 for k in range(1, tiles_w) if c0 < k * side < c1),
            ),
        ]
        return panels, torch.tensor(out), (r0, r1, c0, c1), (tiles_h, tiles_w)

    def image_grids(self, inputs) -> list[tuple[list, torch.Tensor]]:
        """Two panels per image: the base view (one tile's grid) and the high-resolution tiles side by
        side as the image's grid, without the rows / columns un-padding removed; each row newline ends
        its row of the high-resolution grid."""
        out = []
        for image in range(len(inputs["image_sizes"])):
            panels, cells, _, _ = self._drawn_layout(inputs, image)
            out.append((panels, cells))
        return out

    def model_view(self, inputs, processor) -> list[list]:
        """Per image: the base view (stretched back to the image's aspect ratio) and the high-resolution
        tiles stitched together, cut to the un-padded part."""
        from PIL import Image

        from ..viz import picture_from_pixels

        cfg = self.model.config
        tile = cfg.vision_config.image_size
        patch = cfg.vision_config.patch_size
        pixels = inputs["pixel_values"]
        out, first = [], 0
        for image, (height, width) in enumerate(inputs["image_sizes"].tolist()):
            _, _, (r0, r1, c0, c1), (tiles_h, tiles_w) = self._drawn_layout(inputs, image)
            count = 1 + tiles_h * tiles_w
            if pixels.dim() == 5:  # [images, tiles (padded), 3, H, W]
                tiles = pixels[image, :count]
            else:  # [all tiles, 3, H, W]
                tiles, first = pixels[first : first + count], first + count
            base = picture_from_pixels(tiles[0], processor)
            scale = tile / max(height, width)
            base = base.resize((max(1, round(width * scale)), max(1, round(height * scale))))
            canvas = Image.new("RGB", (tiles_w * tile, tiles_h * tile))
            for k in range(count - 1):
                at = (k % tiles_w * tile, k // tiles_w * tile)
                canvas.paste(picture_from_pixels(tiles[1 + k], processor), at)
            out.append([base, canvas.crop((c0 * patch, r0 * patch, c1 * patch, r1 * patch))])
        return out
