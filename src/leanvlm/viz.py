"""Pictures of which image patches survive each reduction stage (the figure these papers show)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigError


def survival_grids(trace, grids: list[tuple[int, int]], sample: int = 0) -> list[list[torch.Tensor]]:
    """Per stage, per image: a [rows, cols] bool grid of the visual tokens present from that stage on."""
    first = trace.stages[0]
    visual_positions = first.orig[sample][first.visual[sample]]  # original indices of all visual tokens
    total = sum(r * c for r, c in grids)
    if visual_positions.numel() != total:
        raise ConfigError(
            f"the prompt has {visual_positions.numel()} visual tokens but its images give {total}"
        )
    out = []
    for stage, kept in zip(trace.stages, trace.kept_visual, strict=True):
        present = torch.isin(visual_positions, kept[sample].to(visual_positions.device))
        per_image, offset = [], 0
        for rows, cols in grids:
            per_image.append(present[offset : offset + rows * cols].view(rows, cols).cpu())
            offset += rows * cols
        out.append(per_image)
        del stage
    return out


def render(image, grid: torch.Tensor, size: int, dim: float = 0.75):
    """The image resized to ``size`` x ``size`` with dropped patches darkened by ``dim``."""
    from PIL import Image, ImageDraw

    img = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    shade = Image.new("RGB", img.size, (0, 0, 0))
    mask = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(mask)
    rows, cols = grid.shape
    for r in range(rows):
        for c in range(cols):
            if not grid[r, c]:
                box = (
                    c * size // cols,
                    r * size // rows,
                    (c + 1) * size // cols - 1,
                    (r + 1) * size // rows - 1,
                )
                draw.rectangle(box, fill=int(255 * dim))
    return Image.composite(shade, img, mask)


def stage_images(trace, grids, views, size: int, sample: int = 0) -> list[tuple[str, object]]:
    """[(file stem, PIL image)] per stage; several images of a prompt are placed side by side."""
    from PIL import Image, ImageDraw

    images = []
    for s_idx, (stage, per_image) in enumerate(
        zip(trace.stages, survival_grids(trace, grids, sample), strict=True)
    ):
        canvas = Image.new("RGB", (size * len(per_image), size))
        for i, (view, grid) in enumerate(zip(views, per_image, strict=True)):
            canvas.paste(render(view, grid, size), (i * size, 0))
        kept = sum(int(g.sum()) for g in per_image)
        total = sum(g.numel() for g in per_image)
        label = "input" if s_idx == 0 else f"from layer {stage.layer}"
        ImageDraw.Draw(canvas).text((4, 2), f"{label}: {kept}/{total} visual tokens", fill=(255, 255, 0))
        stem = "stage0_input" if s_idx == 0 else f"stage{s_idx}_layer{stage.layer}"
        images.append((stem, canvas))
    return images


def write_stage_pngs(
    trace, grids, views, out_dir: str | Path, size: int = 336, sample: int = 0
) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, img in stage_images(trace, grids, views, size, sample):
        path = out_dir / f"{stem}.png"
        img.save(path)
        paths.append(path)
    return paths
