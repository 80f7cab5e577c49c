"""Training-step time (forward + backward) with token reduction; writes JSON.

Usage: python benchmarks/train_step.py [--repeats 5] [--out PATH]

Writes ``leanvlm-train-step.json`` in the current folder unless ``--out`` says otherwise; the committed
figures are ``--out benchmarks/results/train_step_cpu.json``.

Model: the `bench-cpu` preset (32-layer, hidden-256 LLaVA with LLaVA-1.5's 576 visual tokens per
image, random weights), vision tower frozen as in LLaVA's fine-tuning stage. Batch: two right-padded
conversations with one image each, labels on the answers only, so visual tokens dominate the
sequence as in LLaVA-style SFT. Configurations, timed interleaved in one run (median of repeats):
no method; PyramidDrop's default schedule; LLaVolta's `4stage` schedule, reported per stage and as
the mean over its four equal stages (what a full training run averages to).
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
from leanvlm.presets import build_preset, demo_image
from leanvlm.train.data import collate, to_messages

QUESTIONS = [
    ("What is shown in this image? Describe it briefly.", "A cat sitting on a red chair next to a window."),
    ("How many trees are in the picture and what color is the sky?", "Two trees, and the sky is blue."),
]


def build_batch(proc):
    samples = []
    for i, (question, answer) in enumerate(QUESTIONS):
        conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        messages = to_messages(conv)
        prompt = proc.apply_chat_template(messages[:1], add_generation_prompt=True)
        full = proc.apply_chat_template(messages)
        enc = proc(text=full, images=[demo_image(336, seed=i)], return_tensors="pt")
        n_prompt = proc(text=prompt, images=[demo_image(336, seed=i)], return_tensors="pt")[
            "input_ids"
        ].shape[1]
        labels = enc["input_ids"][0].clone()
        labels[:n_prompt] = -100
        samples.append(
            {
                "input_ids": enc["input_ids"][0],
                "attention_mask": enc["attention_mask"][0],
                "pixel_values": enc["pixel_values"],
                "labels": labels,
            }
        )
    return collate(samples, proc.tokenizer.pad_token_id)


def step_time(model, batch, methods) -> float:
    handle = lv.apply(model, *methods)
    try:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        return (time.perf_counter() - start) * 1e3
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out",
        default="leanvlm-train-step.json",
        help="where to write the JSON (default: %(default)s; the committed figures: benchmarks/results/train_step_cpu.json)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, proc = build_preset("bench-cpu")
    model.train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    batch = build_batch(proc)
    schedule = lv.StagedSchedule.preset("4stage")
    configs = {"none": ()}
    configs["PyramidDrop default (8/16/24, 50/25/12.5%)"] = (lv.PyramidDrop(),)
    for i, (_, method) in enumerate(schedule.stages):
        configs[f"LLaVolta 4stage, stage {i + 1}: {method.describe() if method else 'none'}"] = (
            (method,) if method else ()
        )
    samples = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.warmup + args.repeats):
        shift = r % len(names)  # rotate the order: no config always runs first
        for name in names[shift:] + names[:shift]:
            methods = configs[name]
            t = step_time(model, batch, methods)
            if r >= args.warmup:
                samples[name].append(t)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    base = medians["none"]
    stage_names = [n for n in configs if n.startswith("LLaVolta")]
    llavolta_mean = sum(medians[n] for n in stage_names) / len(stage_names)
    rows = [
        {
            "config": n,
            "step_ms": round(m, 1),
            "min_ms": round(min(samples[n]), 1),
            "ratio_vs_none": round(m / base, 3),
        }
        for n, m in medians.items()
    ]
    rows.append(
        {
            "config": "LLaVolta 4stage, mean over the schedule",
            "step_ms": round(llavolta_mean, 1),
            "ratio_vs_none": round(llavolta_mean / base, 3),
        }
    )
    result = {
        "benchmark": "training step (forward + backward)",
        "model": "preset bench-cpu: LLaVA-shaped, 32 layers, hidden 256, 576 visual tokens per image, random weights",
        "batch": {"samples": 2, "tokens": list(batch["input_ids"].shape), "visual_per_sample": 576},
        "trainable": "LLM + projector (vision tower frozen)",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dtype": "float32",
        "attn": "sdpa",
        "hardware": describe_hardware("cpu"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['config'][:70]:70s} {row['step_ms']:8.1f} ms  x{row['ratio_vs_none']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
