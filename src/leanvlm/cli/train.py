"""``leanvlm train``: fine-tune a LLaVA-style model with token reduction (a method or a schedule)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..errors import ConfigError
from .common import add_device_args, add_model_args

HELP = "fine-tune a VLM on LLaVA-format data with a token-reduction method or a staged schedule"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help=HELP, description=HELP)
    add_model_args(p, default_preset=None)
    p.add_argument("--data", required=True, help="LLaVA-format JSON list of conversations")
    p.add_argument(
        "--image-folder", help="folder the data's image paths are relative to (default: the data's)"
    )
    p.add_argument("--method", help="method spec NAME[:key=value,...], e.g. pyramiddrop (default: none)")
    p.add_argument(
        "--schedule", help="staged schedule: a preset (4stage, heavy, light) or 'frac:spec;frac:spec'"
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--batch-size", type=int, default=1, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument(
        "--freeze", default="vision", choices=["vision", "none"], help="what stays frozen (default: vision)"
    )
    p.add_argument(
        "--train-parts",
        default="all",
        choices=["all", "modules", "modules+projector"],
        help="what trains: all (what --freeze leaves; default), modules (only the method's own modules, "
        "e.g. ProxyV's), modules+projector (ProxyV's pretraining stage)",
    )
    p.add_argument(
        "--modules-lr", type=float, help="learning rate of the method's own modules (default: --lr)"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--logging-steps",
        type=int,
        default=10,
        help="log the loss every N optimizer steps, and at the last step (default: 10)",
    )
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--save-total-limit", type=int, default=2)
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from a checkpoint folder, or the latest one in --output-dir (weights, optimizer, "
        "step; --logging-steps and --save-steps are this command's)",
    )
    p.add_argument("--deepspeed", help="DeepSpeed config JSON (run under accelerate launch / deepspeed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import a Python module first (one that registers methods of its own); repeatable",
    )
    p.add_argument("--no-progress", action="store_true")
    add_device_args(p)


def run(args) -> int:
    from ..train.recipe import run as run_recipe

    if not args.model and not args.preset:
        raise ConfigError("give --model PATH_OR_ID (or --preset NAME for a random-weight model)")
    for key in ("batch_size", "grad_accum", "logging_steps"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    for module in args.imports or ():  # a user's module that registers methods of its own
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"--import {module}: {error}") from None
    try:
        summary = run_recipe(args)
    finally:
        _end_distributed()
    if not summary.pop("main_process"):
        return 0  # data-parallel training: the main process writes the summary
    path = Path(args.output_dir) / "train_summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{trained_message(summary)}; model and processor in {args.output_dir}; summary in {path}")
    return 0


def trained_message(summary: dict) -> str:
    """``trained 8 steps, loss 2.1034 at step 8 (mean 2.4410 over this run)``: the last logged loss, with its
    step (a resumed run counts its steps from the start of training, the mean only over its own)."""
    steps, losses = summary["steps"], summary["losses"]
    if not losses:  # no step ran (or no log survived): the Trainer's mean, when it has one
        mean = summary.get("train_loss")
        return f"trained {steps} steps" + (f", mean loss {mean:.4f}" if mean is not None else "")
    at = (summary.get("loss_steps") or [None])[-1]
    where = f" at step {at}" if at is not None else ""
    return f"trained {steps} steps, loss {losses[-1]:.4f}{where} (mean {summary['train_loss']:.4f} over this run)"


def _end_distributed() -> None:
    """Close the process group a data-parallel run opened (left open, gloo's threads can abort the
    interpreter at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
