"""``leanvlm eval``: lmms-eval with the leanvlm model plugin, and a summary of scores and costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError, LeanVLMError

HELP = "evaluate a model with a method on lmms-eval tasks (scores next to visual tokens, FLOPs, time)"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--method", default="none", help="method spec NAME[:key=value,...] (default: none)")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    p.add_argument("--include-path", help="folder with extra task YAMLs")
    p.add_argument("--limit", type=float, help="samples per task (a count, or a fraction below 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--output-dir",
        default="leanvlm-eval",
        help="where lmms-eval and leanvlm write (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--max-new-tokens", type=int, default=None, help="for tasks that set no limit")


def model_args(args, stats_path: Path) -> str:
    """The --model_args string: loading options, then the method's own arguments."""
    from ..methods.spec import parse_kwargs, parse_method

    method = parse_method(args.method)  # validate here, with the API's messages, before lmms-eval starts
    # lmms-eval passes --batch_size and --device to the model itself
    items = [f"pretrained={args.model}", f"attn={args.attn}", f"stats_path={stats_path}"]
    if args.dtype:
        items.append(f"dtype={args.dtype}")
    if args.max_new_tokens:
        items.append(f"max_new_tokens={args.max_new_tokens}")
    if method is None:
        items.append("method=none")
    else:
        items.append(f"method={method.name}")
        # only the spec's own arguments: the plugin sets the rest for the model's depth, as every command
        for key, value in parse_kwargs(args.method.partition(":")[2]).items():
            items.append(f"{key}={list(value) if isinstance(value, tuple) else value}".replace(" ", ""))
    return ",".join(items)


def find_results(output_dir: Path) -> Path | None:
    found = sorted(output_dir.rglob("*results*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run(args) -> int:
    import importlib.util

    from ..loading import check_device, load_config, looks_local
    from ..methods.spec import parse_method

    parse_method(args.method)  # bad inputs first, one line each, before anything else is asked for
    check_device(args.device)
    if looks_local(args.model):
        load_config(args.model)  # a folder that does not exist, or a model no adapter serves
    if importlib.util.find_spec("lmms_eval") is None:
        raise ConfigError(
            "leanvlm eval needs lmms-eval: see docs/eval.md (scripts/install_eval.sh on CPU machines)"
        )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be >= 1")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats_path = out / "leanvlm_stats.json"
    if stats_path.exists():
        stats_path.unlink()
    before = find_results(out)
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "eval",
        "--model",
        "leanvlm",
        "--model_args",
        model_args(args, stats_path),
        "--tasks",
        args.tasks,
        "--batch_size",
        str(args.batch_size),
        "--device",
        args.device,
        "--output_path",
        str(out),
        "--log_samples",
    ]
    if args.include_path:
        cmd += ["--include_path", args.include_path]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit if args.limit < 1 else int(args.limit))]
    print("running:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(
        cmd, env={**os.environ, "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "0")}
    )
    results_path = find_results(out)
    # lmms-eval can exit 0 after an evaluation error: trust the results file, not the exit code
    if proc.returncode != 0 or results_path is None or results_path == before:
        raise LeanVLMError(
            f"lmms-eval did not write results (exit code {proc.returncode}); see its log above"
        )
    results = json.loads(results_path.read_text())["results"]
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    print(f"\nresults: {results_path}")
    for task, metrics in results.items():
        shown = ", ".join(
            f"{k.removesuffix(',none')}={v:.4g}"
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k
        )
        print(f"  {task}: {shown}")
    if stats:
        m = stats["mean"]
        print(
            f"leanvlm ({stats_path}): {stats['samples']} generated samples, mean visual tokens "
            f"{m['visual_tokens_in']:.1f} -> {m['visual_tokens_kept']:.1f} (layer average {m['equivalent_tokens']:.1f}), "
            f"prefill {m['prefill_flops'] / 1e9:.3g} GFLOPs, {m['prefill_ms']:.1f} ms, decode {m['decode_ms']:.1f} ms"
        )
    return 0
