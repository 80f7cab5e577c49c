"""What used to happen without a word: configs that keep no visual token, a PyramidDrop budget that keeps
2 of 576, peak memory reading 0, noisy speedups printed as facts, a script overwriting committed figures."""

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm.bench import build_configs, format_table, timing_notes
from leanvlm.bench.runner import NOISY_SPREAD, BenchConfig, PeakMemory, Settings, measure, release_free_memory

ROOT = Path(__file__).resolve().parents[1]


def test_fastv_keep_tokens_0_warns_when_made():
    with pytest.warns(UserWarning, match="keep_tokens=0 keeps no visual token"):
        lv.FastV(keep_tokens=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lv.FastV(keep_tokens=1)
        lv.FastV(keep_ratio=0.001)  # depends on the image's token count: warned when run


@pytest.mark.parametrize(
    "method, owner",
    [
        (lv.FastV(layer=2, keep_ratio=0.001), "FastV"),
        (lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.01)), "PyramidDrop"),
    ],
)
def test_keeping_no_visual_token_warns_when_run(method, owner):
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    expected = f"{owner} keeps none of the {n} visual tokens from layer"
    with lv.apply(model, method), torch.no_grad(), pytest.warns(UserWarning, match=expected):
        model(**inputs)


def test_keeping_some_visual_tokens_does_not_warn():
    model, proc = build("llava")
    inputs = make_inputs(proc, PROMPTS[:1])
    for method in (lv.FastV(layer=2, keep_ratio=0.1), lv.PyramidDrop(layers=(1, 2, 3))):
        with warnings.catch_warnings(), lv.apply(model, method), torch.no_grad():
            warnings.simplefilter("error")
            model(**inputs)


def test_pyramiddrop_budget_that_empties_the_last_stage_is_refused_and_skipped_by_bench():
    with pytest.raises(
        lv.ConfigError, match=r"would keep 0\.47% of the visual tokens \(2 of LLaVA-1\.5's 576\)"
    ):
        lv.PyramidDrop.at_budget(0.3, 32)
    assert int(576 * lv.PyramidDrop.at_budget(0.333, 32).keep_ratios[-1]) >= 576 // 64
    skipped: list = []
    configs = build_configs(["pyramiddrop"], ["0.3", "0.5"], 32, skipped)
    assert [c.label for c in configs[2:]] == ["pyramiddrop @ 0.5"]
    assert skipped[0][0] == "pyramiddrop @ 0.3" and "is 0.333" in skipped[0][1]


def test_peak_memory_counts_memory_that_an_earlier_run_freed():
    """The C heap keeps freed memory for reuse; without handing it back first, a run that reuses it reads 0."""
    if not release_free_memory():
        pytest.skip("no malloc_trim here: PeakMemory reports None (tested below)")
    chunk = 2 * 2**20 // 4  # 2 MiB of float32: below glibc's mmap threshold once it has grown

    def work():
        kept = [torch.ones(chunk) for _ in range(12)]  # 24 MiB, touched
        time.sleep(0.05)  # the sampler looks every millisecond
        return len(kept)

    big = torch.ones(6 * 2**20)  # 24 MiB through mmap: freeing it raises glibc's mmap and trim thresholds
    del big
    work()  # leaves 24 MiB of free heap behind, kept for reuse
    with PeakMemory(torch.device("cpu")) as mem:
        work()
    assert mem.unavailable is None and mem.peak >= 18 * 2**20


def test_peak_memory_is_none_with_a_reason_without_malloc_trim(monkeypatch):
    import leanvlm.bench.runner as runner

    monkeypatch.setattr(runner, "_malloc_trim", False)
    with PeakMemory(torch.device("cpu")) as mem:
        torch.ones(2**20)
    assert mem.peak is None and "malloc_trim" in mem.unavailable


def test_bench_rows_report_peak_memory_and_spread():
    from leanvlm.flops import dtype_size
    from leanvlm.presets import build_preset, demo_image
    from leanvlm.registry import find_adapter

    model, proc = build_preset("demo")  # 8 layers, 576 visual tokens: a KV cache of megabytes
    model.eval()
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        add_generation_prompt=True,
    )
    inputs = proc(images=[demo_image(336)], text=text, return_tensors="pt")
    configs = [
        BenchConfig("none (unmodified model)", None),
        BenchConfig("fastv", (lv.FastV(keep_ratio=0.25),)),
    ]
    shape = type(find_adapter(model)).model_shape(model.config)
    rows = measure(
        model,
        inputs,
        configs,
        Settings(repeats=1, warmup=0, new_tokens=2),
        shape,
        dtype_bytes=dtype_size(torch.float32),
    )
    for row in rows:
        assert row["prefill_ms_spread"] is not None and row["prefill_ms_spread"] >= 0
        assert isinstance(row["noisy"], bool)
        if release_free_memory():  # both rows hold a KV cache of megabytes; the second reuses freed memory
            assert row["peak_mem_mib"] > 1, row
    if release_free_memory():
        assert rows[1]["peak_mem_mib"] < rows[0]["peak_mem_mib"]  # a quarter of the visual tokens


def _row(config, spread, speedup, peak=1.0, note=None):
    return {
        "config": config,
        "visual_tokens_kept": 576,
        "equivalent_tokens": 576.0,
        "prefill_flops": 1e9,
        "prefill_ms": 100.0,
        "selection_ms": 0.0,
        "ttft_ms": 110.0,
        "decode_tok_s": 30.0,
        "peak_mem_mib": peak,
        "peak_mem_note": note,
        "kv_bytes": 2**20,
        "speedup": speedup,
        "flops_ratio": 1.0,
        "prefill_ms_spread": spread,
        "noisy": spread > NOISY_SPREAD,
    }


def test_noisy_speedups_are_marked_and_the_spread_is_printed():
    rows = [_row("none (unmodified model)", 0.02, 1.0), _row("fastv @ 0.5", 0.85, 0.009)]
    table = format_table(rows)
    assert "0.01x?" in table and "1.00x?" not in table
    (line,) = timing_notes(rows)
    assert "1 of 2 rows" in line and "up to 85% in 'fastv @ 0.5'" in line and "not reliable" in line
    quiet = [_row("none (unmodified model)", 0.02, 1.0), _row("fastv @ 0.5", 0.03, 1.9)]
    assert "?" not in format_table(quiet) and timing_notes(quiet) == []


def test_peak_memory_note_is_printed_when_it_was_not_measured():
    rows = [
        _row("a", 0.01, 1.0, peak=None, note="no malloc_trim"),
        _row("b", 0.01, 1.0, peak=None, note="no malloc_trim"),
    ]
    assert timing_notes(rows) == ["peak MiB n/a: no malloc_trim"]
    assert "n/a" in format_table(rows)


@pytest.mark.parametrize(
    "script, default, committed",
    [
        ("prefill.py", "leanvlm-prefill.json", "benchmarks/results/prefill_cpu.json"),
        ("train_step.py", "leanvlm-train-step.json", "benchmarks/results/train_step_cpu.json"),
    ],
)
def test_benchmark_scripts_do_not_write_the_committed_figures_by_default(script, default, committed):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},  # argparse wraps help text at hyphens
    )
    assert result.returncode == 0, result.stderr[-2000:]
    help_text = " ".join(result.stdout.split())
    assert f"(default: {default};" in help_text and committed in help_text
