"""The pictures: ``leanvlm viz`` stage PNGs (kept / dropped / pooled groups, legends, LLaVA-NeXT tiles,
Qwen-VL patches) and the ``bench --plot`` figure (legend per method, no overlapping labels)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from models import build
from PIL import Image

import leanvlm as lv
from leanvlm.cli.main import main
from leanvlm.engine.trace import StageRecord, Trace, merged_carrier
from leanvlm.presets import chat_prompt, demo_image
from leanvlm.viz import DIM, DROPPED, GROUP, KEPT, POOLED, Panel, draw_panel, stage_pictures, token_fates


def run_pictures(adapter: str, method, images: list, size: int = 112):
    model, proc = build(adapter)
    inputs = proc(text=[chat_prompt(proc, "What is shown?", len(images))], images=images, return_tensors="pt")
    with lv.apply(model, method) as applied, torch.inference_mode():
        model(**inputs)
        a = applied.adapter
        layouts, views = a.image_grids(inputs), a.model_view(inputs, proc)
        return applied.trace, layouts, views, stage_pictures(applied.trace, layouts, views, size), inputs


def disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def inside(box, outer) -> bool:
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


# --- what the trace says about pooled tokens ----------------------------------------------------------


def test_carrier_follows_merges_and_later_drops():
    n = 7
    orig = torch.arange(n)[None]
    real = torch.ones(1, n, dtype=torch.bool)
    # merge slots 1, 2 into 1 and 3, 4 into 3
    first = merged_carrier(None, orig, real, torch.tensor([[0, 1, 1, 3, 3, 5, 6]]), n)
    assert first.tolist() == [[0, 1, 1, 3, 3, 5, 6]]
    # the next merge sees slots (orig) 0 1 3 5 6 and puts 3 into 1: 1..4 now ride on 1
    after = merged_carrier(
        first, torch.tensor([[0, 1, 3, 5, 6]]), real[:, :5], torch.tensor([[0, 1, 1, 3, 4]]), n
    )
    assert after.tolist() == [[0, 1, 1, 1, 1, 5, 6]]
    # padding / inserted slots (not real) leave the map alone
    fake = torch.tensor([[True, True, False, True, True]])
    odd = merged_carrier(first, torch.tensor([[0, 1, 3, 5, 6]]), fake, torch.tensor([[0, 1, 1, 3, 4]]), n)
    assert odd.tolist() == first.tolist()

    visual = torch.tensor([[False, True, True, True, True, True, False]])
    valid = torch.ones(1, n, dtype=torch.bool)
    stages = [
        StageRecord(0, orig, valid, visual),
        StageRecord(1, torch.tensor([[0, 1, 3, 5, 6]]), valid[:, :5], visual[:, [0, 1, 3, 5, 6]], first),
        # slot 3 (the leader of 3, 4) and token 5 dropped
        StageRecord(2, torch.tensor([[0, 1, 6]]), valid[:, :3], visual[:, [0, 1, 6]], first),
    ]
    trace = Trace(num_layers=3, stages=stages)
    fates = token_fates(trace)
    assert [f.tolist() for f, _ in fates] == [
        [KEPT] * 5,
        [POOLED, POOLED, POOLED, POOLED, KEPT],
        [POOLED, POOLED, DROPPED, DROPPED, DROPPED],
    ]
    assert fates[1][1].tolist() == [1, 1, 3, 3, -1]
    assert stages[1].pooled_groups() == {1: [1, 2], 3: [3, 4]}
    assert stages[2].pooled_groups() == {1: [1, 2]}


def test_vcc_trace_records_its_groups():
    image = [demo_image(56)]
    trace, *_ = run_pictures("llava", lv.VisualContextCompression(layer=2, stride=8), image)
    first = int(trace.stages[0].orig[0][trace.stages[0].visual[0]][0])  # the first visual token
    assert trace.stages[0].carrier is None and trace.stages[0].pooled_groups() == {}
    assert trace.stages[-1].pooled_groups() == {
        first: list(range(first, first + 8)),
        first + 8: list(range(first + 8, first + 16)),
    }
    trace, *_ = run_pictures("llava", lv.VisualContextCompression(layer=2, stride=4, pool="2d"), image)
    groups = trace.stages[-1].pooled_groups()
    assert sorted(groups[first]) == [first, first + 1, first + 4, first + 5]  # a 2x2 block of the 4x4 grid
    assert len(groups) == 4


@pytest.mark.parametrize(
    "method",
    [
        lv.VisualContextCompression(layer=2, stride=8),
        lv.SparseVLM(keep_ratio=0.5, layers=(0, 1, 2)),
        lv.PyramidDrop(layers=(1, 3), keep_ratios=(0.5, 0.25)),
    ],
    ids=["vcc", "sparsevlm", "pyramiddrop"],
)
def test_fates_account_for_every_token_the_llm_sees(method):
    trace, *_ = run_pictures("llava", method, [demo_image(56)])
    for stage, (fate, group) in zip(trace.stages, token_fates(trace), strict=True):
        kept, groups = int((fate == KEPT).sum()), int(group[group >= 0].unique().numel())
        assert kept + groups == int(stage.visual[0].sum())
    last = token_fates(trace)[-1][0]
    if isinstance(method, lv.PyramidDrop):
        assert not (last == POOLED).any() and (last == DROPPED).any()
    else:
        assert (last == POOLED).any()


# --- the stage pictures ---------------------------------------------------------------------------------


def test_pooled_cells_are_outlined_and_not_darkened():
    panel = Panel("", 4, 4)
    index = torch.arange(16)
    cells = torch.stack([index // 4, index % 4], -1)
    fate = torch.tensor([POOLED] * 8 + [KEPT] * 4 + [DROPPED] * 4)
    group = torch.tensor([5] * 8 + [-1] * 8)
    img = draw_panel(Image.new("RGB", (80, 80), (255, 255, 255)), panel, cells, fate, group, 160)
    px = np.asarray(img).astype(int)
    dark = round(255 * (1 - DIM))

    def centre(r, c):
        return px[r * 40 + 20, c * 40 + 20]

    for c in range(4):
        assert (centre(0, c) == 255).all() and (centre(1, c) == 255).all()  # pooled: as bright as kept
        assert (centre(2, c) == 255).all()  # kept
        assert (abs(centre(3, c) - dark) <= 1).all()  # dropped
    # the group's outline runs round its edge, not between its own cells
    assert (px[0, 60] == GROUP).all() and (px[79, 60] == GROUP).all() and (px[20, 0] == GROUP).all()
    assert not (px[20, 39:41] == GROUP).all(-1).any()


def test_vcc_stage_is_not_drawn_as_dropped():
    image = [demo_image(56, seed=2)]
    *_, pooled, _ = run_pictures("llava", lv.VisualContextCompression(layer=2, stride=8), image)
    *_, dropped, _ = run_pictures("llava", lv.UniformDrop(layer=2, keep_ratio=0.125), image)

    def brightness(pic):
        x0, y0, x1, y1 = pic.panels[0]
        return float(np.asarray(pic.image.convert("L"))[y0:y1, x0:x1].mean())

    base = brightness(pooled[0])
    assert pooled[-1].header[-1] == "0 kept, 16 pooled into 2, 0 dropped"
    assert brightness(pooled[-1]) > 0.8 * base  # every patch is still in an average
    assert brightness(dropped[-1]) < 0.5 * base  # 14 of 16 patches darkened


def check_picture(pic, *, legend: list[str]):
    """A legend under the panels with the expected entries and swatches; text that is legible, inside the
    picture, off the panels and never on other text."""
    w, h = pic.image.size
    assert [label.split(":")[0] for label in pic.legend] == legend
    lx0, ly0, lx1, ly1 = pic.legend_box
    assert all(ly0 >= p[3] for p in pic.panels) and ly1 <= h
    region = np.asarray(pic.image)[ly0:ly1, lx0:lx1].reshape(-1, 3)
    assert (region == GROUP).all(-1).any()  # the pooled swatch
    drawn = [t for t in pic.texts if t[0]]
    for label in pic.legend:
        assert any(t == label and inside(box, pic.legend_box) for t, box in drawn)
    for _, box in drawn:
        assert inside(box, (0, 0, w, h))
        assert box[3] - box[1] >= 9  # legible text, not the 9-pixel bitmap font
        assert all(disjoint(box, p) for p in pic.panels)
    for (ta, a), (tb, b) in itertools.combinations(drawn, 2):
        assert disjoint(a, b), (ta, tb)


def test_llava_pictures_have_a_legend_and_separate_labels():
    images = [demo_image(56, seed=1), demo_image(56, seed=4)]
    for method in (
        lv.VisualContextCompression(layer=2, stride=8),
        lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125)),
    ):
        *_, pictures, _ = run_pictures("llava", method, images)
        assert len({p.image.size for p in pictures}) == 1  # flipping through the stages keeps them aligned
        for pic in pictures:
            assert len(pic.panels) == 2  # two images side by side
            check_picture(pic, legend=["kept", "pooled", "dropped"])
        captions = [t for t, _ in pictures[0].texts if t.startswith("image")]
        assert captions == ["image 1: 4x4", "image 2: 4x4"]  # "tokens" wraps under a 112-pixel panel


def test_llava_next_draws_base_view_and_stitched_tiles():
    square = demo_image(112, seed=3)
    trace, layouts, views, pictures, inputs = run_pictures(
        "llava-next", lv.VisualContextCompression(), [square]
    )
    (panels, cells), (base, tiles) = layouts[0], views[0]
    assert [p.title for p in panels] == ["base view", "high-res tiles"]
    assert (panels[1].rows, panels[1].cols, panels[1].tile_rows, panels[1].tile_cols) == (8, 8, (4,), (4,))
    counts = trace.stages[0].visual[0].sum()
    assert cells.shape == (int(counts), 3)
    assert int((cells[:, 2] < 0).sum()) == 8  # one newline per row of the high-res grid
    # the pictures are the image (the tiles in the right order)
    for picture in (base, tiles):
        want = np.asarray(square.resize(picture.size, Image.Resampling.BICUBIC)).astype(float)
        assert np.abs(np.asarray(picture).astype(float) - want).mean() < 12
    for pic in pictures:
        assert len(pic.panels) == 2
        check_picture(pic, legend=["kept", "pooled", "dropped", "row-end token (grey strip)", "tile edge"])

    wide = demo_image(300, seed=3).resize((300, 60))
    _, layouts, views, pictures, _ = run_pictures(
        "llava-next", lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125)), [wide]
    )
    (panels, cells), (base, tiles) = layouts[0], views[0]
    # un-padding keeps 2 of the 4 rows of the 1x2 tile canvas: partial tiles
    assert (panels[1].rows, panels[1].cols, panels[1].tile_rows, panels[1].tile_cols) == (2, 8, (), (4,))
    assert tiles.size == (112, 28) and base.size[0] > 3 * base.size[1]  # base view at the image's aspect
    hi = cells[cells[:, 0] == 1]
    assert hi[:, 1].max() == 1 and hi[:, 2].max() == 7 and int((hi[:, 2] < 0).sum()) == 2
    for pic in pictures:
        check_picture(pic, legend=["kept", "pooled", "dropped", "row-end token (grey strip)", "tile edge"])


@pytest.mark.parametrize("adapter", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_draws_its_merged_patch_grid(adapter):
    image = demo_image(112, seed=6).resize((112, 56))
    _, layouts, views, pictures, inputs = run_pictures(
        adapter, lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125)), [image]
    )
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
    (panels, cells), (picture,) = layouts[0], views[0]
    assert (panels[0].rows, panels[0].cols) == (2, 4) and cells.shape == (8, 3)
    assert picture.size == (112, 56)  # the flattened patches put back in place
    want = np.asarray(image).astype(float)
    assert np.abs(np.asarray(picture).astype(float) - want).mean() < 8
    for pic in pictures:
        check_picture(pic, legend=["kept", "pooled", "dropped"])
    pic = pictures[-1]
    caption = [t for t, box in pic.texts if pic.panels[0][3] <= box[1] and box[3] <= pic.legend_box[1]]
    assert " ".join(caption) == "image: 2x4 tokens"
    assert pic.notes == ["one cell: one visual token, 2x2 patches merged"]
    assert any(t == pic.notes[0] and inside(box, pic.legend_box) for t, box in pic.texts)


@pytest.mark.parametrize(
    "preset, files",
    [
        ("tiny-llava-next", ["stage0_input.png", "stage1_layer2.png"]),
        ("tiny-qwen2-vl", ["stage0_input.png", "stage1_layer2.png"]),
    ],
)
def test_viz_cli_draws_llava_next_and_qwen(capsys, tmp_path, preset, files):
    demo_image(300, seed=3).resize((300, 120)).save(tmp_path / "a.png")
    demo_image(80, seed=5).save(tmp_path / "b.png")
    out = tmp_path / "viz"
    argv = ["viz", "--preset", preset, "--method", "vcc", "--out", str(out), "--size", "160"]
    code = main([*argv, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.png")])
    stdout = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == files
    assert "pooled into" in stdout
    sizes = set()
    for name in files:
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            sizes.add(img.size)
    assert len(sizes) == 1


# --- the bench plot -------------------------------------------------------------------------------------

METHODS = ["cdpruner", "divprune", "fastv", "proxyv", "pyramiddrop", "random", "sparsevlm", "uniform", "vcc"]


def bench_rows() -> list[dict]:
    rows = [
        dict(config="none (unmodified model)", method="unmodified", budget="", flops_ratio=1.0, speedup=1.0),
        dict(
            config="none (leanvlm, no method)", method="no method", budget="", flops_ratio=1.0, speedup=0.99
        ),
    ]
    for i, m in enumerate(METHODS):
        for j, budget in enumerate(["default", "0.5", "0.25"]):
            # points bunched together, as on a small model, where per-point labels collide
            ratio = 0.6 + 0.01 * i + 0.02 * j
            rows.append(
                dict(config=f"{m} @ {budget}", method=m, budget=budget, flops_ratio=ratio, speedup=0.8)
            )
    rows.append(dict(config="fastv:layer=1", method="fastv", budget="spec", flops_ratio=0.5, speedup=0.9))
    for r in rows:
        r["untrained_modules"] = r["method"] == "proxyv"
    return rows


def test_bench_plot_has_one_legend_and_no_overlapping_text(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from leanvlm.bench import plot

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    rows = bench_rows()
    plot(rows, tmp_path / "plot.png", "preset tiny (random weights), cpu float32")
    (fig,) = figures
    try:
        with Image.open(tmp_path / "plot.png") as img:
            assert img.format == "PNG"
        (ax,) = fig.axes
        assert not ax.texts and ax.get_legend() is None  # no labels on the points, no legend over them
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels[:3] == ["method (colour)", "unmodified model", "leanvlm, no method"]
        for m in METHODS:
            assert sum(label.split(" (")[0] == m for label in labels) == 1
        assert "proxyv (untrained modules: hollow)" in labels
        for setting in ("the method's default", "budget 0.5", "budget 0.25", "fastv:layer=1"):
            assert setting in labels
        assert "ideal: speedup = 1 / FLOPs ratio" in labels
        # every row has its own colour and marker
        keys = set()
        for coll in ax.collections:
            colour = coll.get_facecolor()
            colour = coll.get_edgecolor() if not len(colour) or colour[0][3] == 0 else colour
            keys.add((tuple(np.round(colour[0], 3)), coll.get_paths()[0].vertices.round(3).tobytes()))
        assert len(ax.collections) == len(rows) and len(keys) == len(rows)

        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        page = fig.bbox
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
        shown = {*ax.get_xticklabels(), *ax.get_yticklabels()}
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        ticks = [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]
        ticks += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
        texts = [t for t in fig.findobj(Text) if t not in shown and t.get_visible() and t.get_text().strip()]
        texts += ticks
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
        assert len(boxes) > 30
        for text, box in boxes:
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text
        for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (ta, tb)
    finally:
        close(fig)
