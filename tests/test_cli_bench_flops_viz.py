"""leanvlm bench / flops / viz on tiny models: exit codes, table columns, JSON schema, PNGs."""

import json

import numpy as np
import pytest
from PIL import Image

import leanvlm as lv
from leanvlm.bench import build_configs, parse_budgets
from leanvlm.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


ROW_KEYS = {
    "config",
    "prefill_ms_spread",
    "noisy",
    "peak_mem_note",
    "untrained_modules",
    "method",
    "budget",
    "settings",
    "visual_tokens_in",
    "visual_tokens_kept",
    "equivalent_tokens",
    "prefill_flops",
    "paper_flops",
    "prefill_ms",
    "prefill_ms_min",
    "selection_ms",
    "selection_share",
    "selection_flops",
    "ttft_ms",
    "decode_tok_s",
    "peak_mem_mib",
    "kv_bytes",
    "kv_bytes_analytic",
    "visual_per_layer",
    "speedup",
    "ttft_speedup",
    "decode_speedup",
    "flops_ratio",
    "paper_flops_ratio",
    "analytic_speedup",
    "speedup_vs_analytic",
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "3",
        "--budgets",
        "default,0.8",
        "--out",
        str(out),
        "--plot",
        "--no-progress",
    ]
    return argv, out


def test_bench_writes_table_json_and_plot(capsys, bench_run):
    argv, out = bench_run
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0
    header = stdout.splitlines()[1]
    for column in (
        "visual kept",
        "equiv. tok",
        "prefill FLOPs",
        "prefill ms",
        "TTFT ms",
        "decode tok/s",
        "peak MiB",
        "KV MiB",
        "speedup",
        "FLOPs ratio",
    ):
        assert column in header
    doc = json.loads(out.read_text())
    for key in (
        "hardware",
        "versions",
        "dtype",
        "attn",
        "device",
        "shape",
        "prompt_tokens",
        "settings",
        "rows",
    ):
        assert key in doc
    assert doc["versions"]["torch"] and doc["dtype"] == "float32" and doc["attn"] == "sdpa"
    labels = [r["config"] for r in doc["rows"]]
    assert labels == [
        "none (unmodified model)",
        "none (leanvlm, no method)",
        "cdpruner @ default",
        "cdpruner @ 0.8",
        "crossget @ default",
        "divprune @ default",
        "divprune @ 0.8",
        "fastv @ default",
        "fastv @ 0.8",
        "proxyv @ default",
        "pyramiddrop @ default",
        "pyramiddrop @ 0.8",
        "random @ default",
        "random @ 0.8",
        "sparsevlm @ default",
        "sparsevlm @ 0.8",
        "uniform @ default",
        "uniform @ 0.8",
        "vcc @ default",
        "vcc @ 0.8",
        "visionzip @ default",
        "visionzip @ 0.8",
    ]
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS
        assert row["kv_bytes"] == row["kv_bytes_analytic"]  # the real cache matches the trace's count
        assert len(row["visual_per_layer"]) == 4
    rows = {r["config"]: r for r in doc["rows"]}
    assert rows["none (unmodified model)"]["flops_ratio"] == 1.0
    assert rows["fastv @ default"]["visual_per_layer"] == [16, 16, 8, 8]  # lv.FastV(): keep 50% after layer 2
    assert rows["fastv @ 0.8"]["equivalent_tokens"] == pytest.approx(0.8 * 16, abs=0.5)
    assert rows["fastv @ default"]["flops_ratio"] < 1.0
    for label in ("visionzip @ default", "cdpruner @ 0.8", "divprune @ default"):  # before the LLM
        row = rows[label]
        assert row["visual_tokens_in"] == 16 and row["visual_per_layer"][0] < 16
        assert row["selection_ms"] > 0 and row["selection_flops"] > 0
        assert row["selection_share"] == pytest.approx(row["selection_ms"] / row["prefill_ms"], rel=1e-2)
    assert rows["fastv @ default"]["selection_ms"] > 0 and rows["fastv @ default"]["selection_flops"] == 0
    # trainable methods run with fresh modules, flagged; every visual token stays, the split layers cost less
    assert [r["config"] for r in doc["rows"] if r["untrained_modules"]] == ["proxyv @ default"]
    assert rows["proxyv @ default"]["visual_per_layer"] == [16] * 4
    assert rows["proxyv @ default"]["flops_ratio"] < 1.0
    png = out.with_suffix(".png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1000, 560)  # the legend beside the plot


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "0"], "--budgets item '0' is outside (0, 1]"),
        (["--budgets", "most"], "--budgets item 'most' is neither 'default' nor a number"),
        (["--methods", "warpdrive"], "unknown method 'warpdrive'"),
        (["--preset", "llava-99b"], "unknown preset 'llava-99b'"),
        (["--device", "cuda:7"], "CUDA is not available"),
        (["--repeats", "0"], "--repeats=0 is too small"),
        (
            ["--methods", "fastv", "--budgets", "0.1"],
            "FastV: budget=0.1 is outside (0.5, 1] for layer=2 of 4",
        ),
    ],
)
def test_bench_bad_arguments(capsys, argv, message):
    import torch

    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = run_cli(capsys, "bench", "--preset", "tiny", "--no-progress", *argv)
    assert code == 2
    assert message in err


def test_unreachable_budgets_are_skipped_with_their_reason():
    skipped: list = []
    configs = build_configs(["fastv", "pyramiddrop"], parse_budgets("0.1,0.5"), 32, skipped)
    assert [c.label for c in configs[2:]] == ["fastv @ 0.1", "fastv @ 0.5", "pyramiddrop @ 0.5"]
    assert skipped == [
        (
            "pyramiddrop @ 0.1",
            "PyramidDrop: budget=0.1 is outside (0.25, 1] with stages at layers (8, 16, 24)",
        )
    ]
    with pytest.raises(lv.ConfigError, match="PyramidDrop: budget=0.1 is outside"):
        build_configs(["pyramiddrop"], parse_budgets("0.1"), 32)


def test_matched_budgets_give_matched_equivalent_tokens():
    skipped = []
    configs = build_configs(None, parse_budgets("0.5"), 32, skipped)
    assert [label for label, _ in skipped] == ["crossget @ 0.5", "proxyv @ 0.5"]
    assert "merge_per_layer" in skipped[0][1] and "no token budget" in skipped[1][1]
    cdpruner, divprune, fastv, pdrop, random, sparsevlm, uniform, vcc, visionzip = (
        c.methods[0] for c in configs[2:]
    )
    for method in (cdpruner, divprune, fastv, pdrop, random, uniform, visionzip):
        visual = method.visual_schedule(32, [576])
        assert sum(visual) / 32 == pytest.approx(288, abs=2)
    assert pdrop == lv.PyramidDrop.at_budget(0.5, 32)
    # clusters come on top of SparseVLM's budget, as in the reference
    assert sum(sparsevlm.visual_schedule(32, [576])) / 32 == pytest.approx(288, rel=0.05)
    pooled = (2 * 576 + 30 * -(-576 // vcc.stride)) / 32  # pooling strides are integers: close, not exact
    assert pooled == pytest.approx(288, rel=0.1)


def test_flops_command_pyramiddrop_preset(capsys):
    code, out, _ = run_cli(
        capsys, "flops", "--preset", "llava-1.5-7b", "--method", "none", "--method", "pyramiddrop"
    )
    assert code == 0
    assert "3.82T" in out and "1.78T" in out  # paper convention, published figures
    assert "equivalent visual tokens (layer average): 270.0" in out
    assert "real FLOPs (2 per multiply-add, whole prompt)" in out


def test_flops_command_json(capsys):
    code, out, _ = run_cli(capsys, "flops", "--method", "fastv:layer=2,keep_ratio=0.5", "--json")
    assert code == 0
    doc = json.loads(out)
    (m,) = doc["methods"]
    assert len(m["layers"]) == 32 and m["layers"][2]["visual"] == 288
    assert m["equivalent_tokens"] == 306.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--method", "fastv:layer=40"],
            "FastV: layer=40 is outside [1, 31] for this model (32 decoder layers)",
        ),
        (["--text-tokens", "-1"], "--text-tokens=-1 must be >= 0"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_flops_bad_arguments(capsys, argv, message):
    code, _, err = run_cli(capsys, "flops", *argv)
    assert code == 2 and message in err


def test_viz_writes_one_png_per_stage(capsys, tmp_path):
    out = tmp_path / "viz"
    code, stdout, _ = run_cli(
        capsys,
        "viz",
        "--preset",
        "tiny",
        "--method",
        "pyramiddrop:layers=[1,3],keep_ratios=[0.5,0.25]",
        "--out",
        str(out),
        "--size",
        "112",
    )
    assert code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["stage0_input.png", "stage1_layer1.png", "stage2_layer3.png"]
    dark, sizes = [], set()
    for name in files:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 112 and img.height > 112  # header and legend
            sizes.add(img.size)
            dark.append(int((np.asarray(img.convert("L")) < 20).sum()))
    assert len(sizes) == 1
    assert dark[0] < dark[1] < dark[2]  # more patches are dimmed at each stage
    assert "stage1_layer1.png: from layer 1 on: 8 of 16 visual tokens; 8 kept, 8 dropped" in stdout


def test_viz_refuses_no_method(capsys, tmp_path):
    code, _, err = run_cli(capsys, "viz", "--preset", "tiny", "--method", "none", "--out", str(tmp_path))
    assert code == 2 and "--method none drops nothing" in err


@pytest.mark.parametrize("preset", ["tiny-llava-next", "tiny-qwen2.5-vl"])
def test_bench_runs_on_other_adapters(capsys, tmp_path, preset):
    out = tmp_path / "bench.json"
    code, _, _ = run_cli(
        capsys,
        "bench",
        "--preset",
        preset,
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--budgets",
        "default",
        "--methods",
        "fastv",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == [
        "none (unmodified model)",
        "none (leanvlm, no method)",
        "fastv @ default",
    ]
    assert rows[2]["visual_tokens_kept"] == rows[0]["visual_tokens_in"] // 2  # lv.FastV(): keep 50%
    assert rows[2]["kv_bytes"] == rows[2]["kv_bytes_analytic"]
    assert rows[0]["prefill_flops"] > rows[2]["prefill_flops"]


@pytest.mark.parametrize("preset", ["llava-next-7b", "qwen2.5-vl-7b"])
def test_flops_command_refuses_variable_size_models(capsys, preset):
    code, _, err = run_cli(capsys, "flops", "--preset", preset, "--method", "fastv")
    assert code == 2 and "the visual-token count depends on the image; use leanvlm bench" in err
