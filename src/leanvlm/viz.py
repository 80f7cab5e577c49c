"""Pictures of which image patches survive each reduction stage (the figure these papers show).

Each stage's picture shows every image as the model saw it, one cell per visual token: a token the
LLM still sees on its own is drawn as is, a dropped one darkened, and the tokens a pooling method
averaged into one (VisualContextCompression, SparseVLM's recycled tokens) outlined together as one
group, undarkened, since every one of them is still part of an average. A header says how many
tokens are left and a legend under the images explains the shading.

Adapters say where each visual token sits (:meth:`~leanvlm.adapters.base.Adapter.image_grids`: one
or more :class:`Panel` per image, e.g. LLaVA-NeXT's base view and its high-resolution tiles) and
give the pictures (:meth:`~leanvlm.adapters.base.Adapter.model_view`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError

#: what became of an input visual token by a stage
KEPT, POOLED, DROPPED = 0, 1, 2

DIM = 0.75  # share of brightness a dropped patch loses
GROUP = (255, 0, 200)  # outline of a pooled group
TINT = 0.6  # how far a pooled group's cells are drawn towards the group's mean colour
TILE = (255, 255, 255)  # tile edges (LLaVA-NeXT)
ROW_END = (150, 150, 150)  # row-end (newline) tokens, which cover no patch
INK = (20, 20, 20)
PAPER = (255, 255, 255)
SWATCH = (205, 205, 205)  # an undarkened patch in the legend


@dataclass(frozen=True)
class Panel:
    """One picture of an image, covered by a ``rows`` x ``cols`` grid of visual tokens.

    ``tile_rows`` / ``tile_cols``: grid lines (in cells) where two tiles the vision tower saw apart
    meet (LLaVA-NeXT's high-resolution tiles)."""

    title: str
    rows: int
    cols: int
    tile_rows: tuple[int, ...] = ()
    tile_cols: tuple[int, ...] = ()
    #: a line under the legend about what one cell is (e.g. Qwen-VL's merged patches)
    note: str = ""


def raster_layout(rows: int, cols: int, title: str = "") -> tuple[list[Panel], torch.Tensor]:
    """One panel whose tokens fill it row by row (LLaVA, Qwen-VL)."""
    index = torch.arange(rows * cols)
    return [Panel(title, rows, cols)], torch.stack([torch.zeros_like(index), index // cols, index % cols], -1)


def picture_from_pixels(pixels: torch.Tensor, processor):
    """A normalised [3, H, W] pixel tensor back to a PIL image, with the processor's mean and std."""
    from PIL import Image

    ip = getattr(processor, "image_processor", processor)
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(3, 1, 1)
    rgb = ((pixels.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def _as_layout(item) -> tuple[list[Panel], torch.Tensor]:
    """Accepts an adapter's (panels, cells) or a bare (rows, cols) grid."""
    if len(item) == 2 and all(isinstance(v, int) for v in item):
        return raster_layout(*item)
    panels, cells = item
    return list(panels), torch.as_tensor(cells, dtype=torch.long).cpu()


def token_fates(trace, sample: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per stage: (fate, group), both [V] long over the prompt's visual tokens in input order. ``fate``:
    :data:`KEPT` (the LLM sees the token itself), :data:`POOLED` (it is averaged into a pooled token
    the LLM sees) or :data:`DROPPED`; ``group``: the original index of the pooled token's slot (-1
    for tokens that are not pooled)."""
    first = trace.stages[0]
    visual_positions = first.orig[sample][first.visual[sample]].cpu()  # original indices of all visual tokens
    out = []
    for stage in trace.stages:
        present = stage.orig[sample][stage.visual[sample]].cpu()  # inserted tokens share an anchor's index
        if stage.carrier is None:
            carrier = torch.arange(int(first.orig.shape[1]))
        else:
            carrier = stage.carrier[sample].cpu()
        lead = carrier[visual_positions]
        size = torch.bincount(carrier, minlength=carrier.numel())[lead]
        here = torch.isin(lead, present)
        fate = torch.where(~here, DROPPED, torch.where(size > 1, POOLED, KEPT))
        out.append((fate, torch.where(fate == POOLED, lead, -1)))
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, AttributeError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


@dataclass
class StagePicture:
    """One stage's picture and where things were drawn on it (boxes are (x0, y0, x1, y1), exclusive)."""

    stem: str
    image: object  # PIL.Image.Image
    header: list[str]
    legend: list[str]
    notes: list[str] = field(default_factory=list)  # lines under the legend
    texts: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    legend_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    panels: list[tuple[int, int, int, int]] = field(default_factory=list)  # each panel's picture area
    header_rows: int = 0  # lines the header text took


def _cell_box(r: int, c: int, panel: Panel, w: int, h: int) -> tuple[int, int, int, int]:
    return c * w // panel.cols, r * h // panel.rows, (c + 1) * w // panel.cols, (r + 1) * h // panel.rows


def draw_panel(
    picture, panel: Panel, cells: torch.Tensor, fate: torch.Tensor, group: torch.Tensor, width: int
):
    """The panel's picture scaled to ``width`` (longer side), plus its row-end strip when it has row-end
    tokens: dropped cells darkened, each pooled group tinted towards its mean colour and outlined.
    ``cells`` [k, 2] (row, col; col -1: the row's end token), ``fate`` / ``group`` [k] of the tokens on
    this panel."""
    from PIL import Image, ImageDraw

    pw, ph = picture.size
    scale = width / max(pw, ph)
    w, h = max(1, round(pw * scale)), max(1, round(ph * scale))
    img = picture.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    cell_w, cell_h = w / panel.cols, h / panel.rows
    has_ends = bool((cells[:, 1] < 0).any()) if cells.numel() else False
    gap = 3
    strip = max(6, min(12, round(cell_w))) if has_ends else 0
    canvas = Image.new("RGB", (w + (gap + strip if has_ends else 0), h), PAPER)
    canvas.paste(img, (0, 0))
    end_x = w + gap

    def box(r: int, c: int):
        if c < 0:
            return end_x, r * h // panel.rows, end_x + strip, (r + 1) * h // panel.rows
        return _cell_box(r, c, panel, w, h)

    draw = ImageDraw.Draw(canvas)
    for r, c in cells.tolist():
        if c < 0:
            x0, y0, x1, y1 = box(r, c)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=ROW_END, outline=PAPER)
    # darken dropped cells
    shade = Image.new("L", canvas.size, 0)
    mask = ImageDraw.Draw(shade)
    for (r, c), f in zip(cells.tolist(), fate.tolist(), strict=True):
        if f == DROPPED:
            x0, y0, x1, y1 = box(r, c)
            mask.rectangle((x0, y0, x1 - 1, y1 - 1), fill=round(255 * DIM))
    canvas = Image.composite(Image.new("RGB", canvas.size, (0, 0, 0)), canvas, shade)
    draw = ImageDraw.Draw(canvas)
    # tile edges
    for r in panel.tile_rows:
        y = r * h // panel.rows
        for x in range(0, w, 8):
            draw.line((x, y, min(x + 4, w - 1), y), fill=TILE)
    for c in panel.tile_cols:
        x = c * w // panel.cols
        for y in range(0, h, 8):
            draw.line((x, y, x, min(y + 4, h - 1)), fill=TILE)
    # pooled groups: each group's cells tinted towards the group's mean colour (what averaging does to
    # them), and an outline along every cell side whose neighbour is in another group
    owner = {}
    for (r, c), g in zip(cells.tolist(), group.tolist(), strict=True):
        if g >= 0:
            owner[(r, panel.cols if c < 0 else c)] = g
    if owner:
        import numpy as np

        pixels = np.asarray(canvas).astype(np.float32)
        members: dict[int, list] = {}
        for (r, c), g in owner.items():
            members.setdefault(g, []).append(box(r, -1 if c == panel.cols else c))
        for boxes in members.values():
            on_image = [b for b in boxes if b[0] < w] or boxes
            total = sum(pixels[y0:y1, x0:x1].reshape(-1, 3).sum(0) for x0, y0, x1, y1 in on_image)
            count = sum(max(0, (x1 - x0) * (y1 - y0)) for x0, y0, x1, y1 in on_image)
            mean = total / max(count, 1)
            for x0, y0, x1, y1 in boxes:
                pixels[y0:y1, x0:x1] = pixels[y0:y1, x0:x1] * (1 - TINT) + mean * TINT
        canvas = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
    line = 1 if min(cell_w, cell_h) < 20 else 2 if min(cell_w, cell_h) < 48 else 3
    for (r, c), g in owner.items():
        x0, y0, x1, y1 = box(r, -1 if c == panel.cols else c)
        x1, y1 = x1 - 1, y1 - 1
        sides = (
            ((r - 1, c), (x0, y0, x1, y0 + line - 1)),
            ((r + 1, c), (x0, y1 - line + 1, x1, y1)),
            ((r, c - 1), (x0, y0, x0 + line - 1, y1)),
            ((r, c + 1), (x1 - line + 1, y0, x1, y1)),
        )
        for neighbour, rect in sides:
            if owner.get(neighbour) != g:
                draw.rectangle(rect, fill=GROUP)
    return canvas


def _legend_items(has_ends: bool, has_tiles: bool):
    """(label, draw(draw, x, y, s)) of each legend entry."""

    def kept(d, x, y, s):
        d.rectangle((x, y, x + s - 1, y + s - 1), fill=SWATCH, outline=(120, 120, 120))

    def pooled(d, x, y, s):
        d.rectangle((x, y, x + 2 * s - 1, y + s - 1), fill=SWATCH, outline=GROUP, width=2)

    def dropped(d, x, y, s):
        dark = tuple(round(v * (1 - DIM)) for v in SWATCH)
        d.rectangle((x, y, x + s - 1, y + s - 1), fill=dark)

    def row_end(d, x, y, s):
        d.rectangle((x + s // 3, y, x + 2 * s // 3, y + s - 1), fill=ROW_END)

    def tile(d, x, y, s):
        d.rectangle((x, y, x + s - 1, y + s - 1), fill=(90, 90, 90))
        for k in range(0, s, 4):
            d.line((x + s // 2, y + k, x + s // 2, min(y + k + 2, y + s - 1)), fill=TILE)

    items = [
        ("kept: the token itself", kept, 1),
        ("pooled: an outlined group is one averaged token", pooled, 2),
        ("dropped", dropped, 1),
    ]
    if has_ends:
        items.append(("row-end token (grey strip)", row_end, 1))
    if has_tiles:
        items.append(("tile edge", tile, 1))
    return items


def _compose(
    stem: str,
    header: list[str],
    images: list[list[tuple[object, str]]],
    ends: bool,
    tiles: bool,
    notes: list[str],
    width_min: int,
    font_size: int,
    header_rows: int = 0,
) -> StagePicture:
    """Header lines, then each image's panels side by side with their captions, then the legend."""
    from PIL import Image, ImageDraw

    font, bold = _font(font_size), _font(font_size + 2)
    line_h = font_size + 6
    pad, image_gap, panel_gap = 8, 20, 10
    row_w = sum(p.size[0] for panels in images for p, _ in panels)
    row_w += image_gap * (len(images) - 1) + panel_gap * sum(len(p) - 1 for p in images)
    items = _legend_items(ends, tiles)
    swatch = font_size
    widest = max(swatch * span + 6 + round(font.getlength(label)) for label, _, span in items)
    width = max(row_w + 2 * pad, width_min, widest + 2 * pad)  # no legend entry runs off the edge
    inner = width - 2 * pad

    header_lines = [
        (line, f)
        for i, h in enumerate(header)
        for f in [bold if i == 0 else font]
        for line in _wrap(h, f, inner)
    ]
    captions = [[_wrap(c, font, p.size[0]) for p, c in panels] for panels in images]
    cap_lines = max((len(c) for caps in captions for c in caps), default=0)
    panel_h = max(p.size[1] for panels in images for p, _ in panels)

    # legend entries flow left to right, wrapping at the canvas width
    placed, x, y = [], 0, 0
    for label, _, span in items:
        w = swatch * span + 6 + round(font.getlength(label))
        if x and x + w > inner:
            x, y = 0, y + line_h
        placed.append((x, y))
        x += w + 18
    note_lines = [line for note in notes for line in _wrap(note, font, inner)]
    legend_h = y + line_h + len(note_lines) * line_h

    top = pad + max(len(header_lines), header_rows) * line_h + 6
    legend_top = top + panel_h + 4 + cap_lines * line_h + 10
    height = legend_top + legend_h + pad
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    pic = StagePicture(stem, canvas, header, [label for label, _, _ in items], header_rows=len(header_lines))

    def text(xy, s, f):
        draw.text(xy, s, fill=INK, font=f)
        box = draw.textbbox(xy, s, font=f)
        pic.texts.append((s, box))

    for i, (line, f) in enumerate(header_lines):
        text((pad, pad + i * line_h), line, f)
    x = pad + (inner - row_w) // 2
    for panels, caps in zip(images, captions, strict=True):
        for k, ((p, _), cap) in enumerate(zip(panels, caps, strict=True)):
            canvas.paste(p, (x, top))
            pic.panels.append((x, top, x + p.size[0], top + p.size[1]))
            for j, line in enumerate(cap):
                text((x, top + p.size[1] + 4 + j * line_h), line, font)
            x += p.size[0] + (panel_gap if k < len(panels) - 1 else image_gap)
    draw.line((pad, legend_top - 6, width - pad, legend_top - 6), fill=(200, 200, 200))
    for (label, paint, span), (lx, ly) in zip(items, placed, strict=True):
        sx, sy = pad + lx, legend_top + ly + (line_h - swatch) // 2 - 1
        paint(draw, sx, sy, swatch)
        text((sx + swatch * span + 6, legend_top + ly), label, font)
    for j, line in enumerate(note_lines):
        text((pad, legend_top + y + line_h * (j + 1)), line, font)
    pic.notes = notes
    pic.legend_box = (pad, legend_top, width - pad, legend_top + legend_h)
    return pic


def stage_pictures(trace, layouts, views, size: int, sample: int = 0) -> list[StagePicture]:
    """One :class:`StagePicture` per stage. ``layouts``: per image, ``(panels, cells)`` as
    :meth:`Adapter.image_grids` gives them (or a bare (rows, cols) grid); ``views``: per image, one
    picture per panel (or one picture)."""
    layouts = [_as_layout(item) for item in layouts]
    views = [list(v) if isinstance(v, (list, tuple)) else [v] for v in views]
    if len(views) != len(layouts):
        raise ConfigError(f"{len(views)} pictures for {len(layouts)} images")
    counts = [int(cells.shape[0]) for _, cells in layouts]
    fates = token_fates(trace, sample)
    total = int(fates[0][0].numel())
    if total != sum(counts):
        raise ConfigError(f"the prompt has {total} visual tokens but its images give {sum(counts)}")
    many = len(layouts) > 1
    font_size = max(13, min(16, size // 22))
    out = []
    for s_idx, (stage, (fate, group)) in enumerate(zip(trace.stages, fates, strict=True)):
        images, offset, has_tiles, has_ends = [], 0, False, False
        notes = list(dict.fromkeys(p.note for panels, _ in layouts for p in panels if p.note))
        for i, ((panels, cells), shown) in enumerate(zip(layouts, views, strict=True)):
            if len(shown) != len(panels):
                raise ConfigError(f"image {i + 1}: {len(shown)} pictures for {len(panels)} panels")
            f_img, g_img = fate[offset : offset + counts[i]], group[offset : offset + counts[i]]
            offset += counts[i]
            drawn = []
            for k, (panel, picture) in enumerate(zip(panels, shown, strict=True)):
                on = cells[:, 0] == k
                img = draw_panel(picture, panel, cells[on][:, 1:], f_img[on], g_img[on], size)
                has_tiles |= bool(panel.tile_rows or panel.tile_cols)
                ends = int((cells[on][:, 2] < 0).sum())
                has_ends |= ends > 0
                name = f"image {i + 1}" if many else ("" if panel.title and len(panels) > 1 else "image")
                title = f"{name} {panel.title}".strip()
                extra = f" + {ends} row ends" if ends else ""
                caption = f"{title}: {panel.rows}x{panel.cols} tokens{extra}"
                drawn.append((img, caption))
            images.append(drawn)
        visual = int(stage.visual[sample].sum())  # tokens the LLM sees: kept ones and pooled ones
        kept, pooled, dropped = (int((fate == k).sum()) for k in (KEPT, POOLED, DROPPED))
        groups = int(group[group >= 0].unique().numel())
        if s_idx == 0:
            header = [f"input: {total} visual tokens", "before any reduction"]
        else:
            where = "entering the LLM" if stage.layer == 0 else f"from layer {stage.layer} on"
            parts = [f"{kept} kept"]
            if pooled:
                parts.append(f"{pooled} pooled into {groups}")
            parts.append(f"{dropped} dropped")
            header = [f"{where}: {visual} of {total} visual tokens", ", ".join(parts)]
        stem = "stage0_input" if s_idx == 0 else f"stage{s_idx}_layer{stage.layer}"
        out.append((stem, header, images, has_ends, has_tiles, notes))
    pictures = [_compose(*item, width_min=420, font_size=font_size) for item in out]
    rows = max(p.header_rows for p in pictures)
    if any(p.header_rows < rows for p in pictures):  # every stage's picture the same size
        pictures = [_compose(*item, width_min=420, font_size=font_size, header_rows=rows) for item in out]
    return pictures


def stage_images(trace, grids, views, size: int, sample: int = 0) -> list[tuple[str, object]]:
    """[(file stem, PIL image)] per stage; several images of a prompt are placed side by side."""
    return [(p.stem, p.image) for p in stage_pictures(trace, grids, views, size, sample)]


def write_stage_pngs(
    trace, grids, views, out_dir: str | Path, size: int = 336, sample: int = 0, log=None
) -> list[Path]:
    """One PNG per stage in ``out_dir``; ``log`` (e.g. ``print``) gets a line per file: its path and
    what its header says."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for pic in stage_pictures(trace, grids, views, size, sample):
        path = out_dir / f"{pic.stem}.png"
        pic.image.save(path)
        paths.append(path)
        if log is not None:
            log(f"wrote {path}: {'; '.join(pic.header)}")
    return paths
