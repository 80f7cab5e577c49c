"""Prefill time of a small LLaVA-shaped model with and without token reduction; writes JSON.

Usage: python benchmarks/prefill.py [--repeats 7] [--out PATH]

Writes ``leanvlm-prefill.json`` in the current folder unless ``--out`` says otherwise; the committed
figures are ``--out benchmarks/results/prefill_cpu.json``.

The model: LLaVA-1.5's 576 visual tokens (336 px, patch 14) on an 8-layer, hidden-512 LLaMA with
random weights, sized so attention and FFN dominate. Every configuration is timed in the same run,
interleaved, after warm-up; medians and minimums are reported, and ratios against the unmodified model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

import leanvlm as lv
from leanvlm.hardware import describe_hardware
from leanvlm.presets import chat_inputs, demo_image, demo_llava

CONFIGS = {
    "unmodified": None,
    "leanvlm, no method": (),
    "FastV keep 25% after layer 2": (lv.FastV(layer=2, keep_ratio=0.25),),
    "PyramidDrop layers 2/4/6, keep 50/25/12.5%": (
        lv.PyramidDrop(layers=(2, 4, 6), keep_ratios=(0.5, 0.25, 0.125)),
    ),
}


def build(attn: str):
    model, proc = demo_llava(attn_implementation=attn, hidden=512, intermediate=1376)
    return model, chat_inputs(proc, "Describe the picture in detail. " * 6, [demo_image(336)])


def time_prefill(model, inputs, methods, repeats: int) -> list[float]:
    handle = lv.apply(model, *methods) if methods is not None else None
    try:
        with torch.inference_mode():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                times.append((time.perf_counter() - start) * 1e3)
        return times
    finally:
        if handle is not None:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out",
        default="leanvlm-prefill.json",
        help="where to write the JSON (default: %(default)s; the committed figures: benchmarks/results/prefill_cpu.json)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, inputs = build(args.attn)
    for methods in CONFIGS.values():
        time_prefill(model, inputs, methods, args.warmup)
    samples = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every config alike
        for name, methods in CONFIGS.items():
            samples[name] += time_prefill(model, inputs, methods, 1)
    base = statistics.median(samples["unmodified"])
    rows = []
    for name, methods in CONFIGS.items():
        visual = None
        if methods is not None:
            with lv.apply(model, *methods) as applied, torch.inference_mode():
                model(**inputs, logits_to_keep=1)
                visual = applied.trace.visual_per_layer[0]
        median = statistics.median(samples[name])
        rows.append(
            {
                "config": name,
                "median_ms": round(median, 2),
                "min_ms": round(min(samples[name]), 2),
                "time_ratio_vs_unmodified": round(median / base, 3),
                "visual_per_layer": visual,
            }
        )
    result = {
        "benchmark": "prefill",
        "model": "LLaVA-shaped, random weights: 8 layers, hidden 512, FFN 1376, 8 heads, CLIP 1 layer",
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "visual_tokens": 576,
        "repeats": args.repeats,
        "attn": args.attn,
        "dtype": "float32",
        "threads": args.threads,
        "hardware": describe_hardware("cpu"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(
            f"{r['config']:45s} {r['median_ms']:8.1f} ms  (min {r['min_ms']:.1f})  x{r['time_ratio_vs_unmodified']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
