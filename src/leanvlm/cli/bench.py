"""``leanvlm bench``: every registered method against no method, at matched budgets, on one model."""

from __future__ import annotations

import sys

import torch

from ..errors import ConfigError
from .common import (
    add_device_args,
    add_model_args,
    check_device,
    default_images,
    load_images,
    load_model,
    resolve_dtype,
)

HELP = "time and count every method against no method on a model (default: a small built-in one)"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help=HELP, description=HELP)
    add_model_args(p, default_preset="bench-cpu")
    p.add_argument(
        "--image", action="append", default=[], help="image file; repeat for several (default: synthetic)"
    )
    p.add_argument("--prompt", default="Describe the picture in detail.", help="the question")
    p.add_argument(
        "--methods", default=None, help="comma-separated method names (default: every registered one)"
    )
    p.add_argument(
        "--method",
        dest="specs",
        action="append",
        default=[],
        metavar="SPEC",
        help="also run this setting as given, e.g. proxyv:start_layer=12 (repeatable; alone, only these run)",
    )
    p.add_argument(
        "--budgets",
        default="default,0.5",
        help="comma list: 'default' (each method's reference setting) and/or the share of visual tokens kept "
        "on average over layers, in (0, 1] (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per config (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens generated for the decode timing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument(
        "--out", default="leanvlm-bench.json", help="where to write the JSON (default: %(default)s)"
    )
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="also write a PNG of speedup against FLOPs ratio (default path: the JSON's, .png)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_args(p)


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..bench import build_configs, format_table, measure, parse_budgets, plot, result_document, write_json
    from ..bench.runner import Settings
    from ..flops import dtype_size
    from ..loading import attach_saved_modules, chat_inputs
    from ..methods.spec import parse_method
    from ..registry import find_adapter

    budgets = parse_budgets(args.budgets)
    for spec in args.specs:  # validated before anything is loaded
        parse_method(spec)
    if len(set(args.specs)) != len(args.specs):
        raise ConfigError(f"--method: a setting is given twice ({', '.join(args.specs)})")
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    for key in ("repeats", "new_tokens"):
        if getattr(args, key) < (2 if key == "new_tokens" else 1):
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)} is too small")
    if args.warmup < 0:
        raise ConfigError(f"--warmup={args.warmup} must be >= 0")
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_images(args.image)
    dtype = resolve_dtype(args)
    model, processor, label = load_model(args, dtype)
    adapter = find_adapter(model)
    skipped: list = []
    configs = build_configs(names, budgets, adapter.num_layers, skipped, args.specs)
    for c in configs[2:]:  # the settings each row runs, resolved for this model's depth
        print(f"leanvlm bench: {c.label} -> {c.methods[0].describe()}", file=sys.stderr)
        attach_saved_modules(model, args.model, c.methods)  # trained modules saved beside the checkpoint
    images = default_images(images, model, "bench")
    inputs = chat_inputs(processor, args.prompt, images, args.device)
    settings = Settings(repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens)
    shape = type(adapter).model_shape(model.config)
    total = (settings.warmup + settings.repeats) * len(configs)
    bar = tqdm(
        total=total, desc="bench", unit="run", disable=args.no_progress, file=sys.stderr, mininterval=1.0
    )

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg[:60])
        bar.update(1)

    try:
        rows = measure(
            model, inputs, configs, settings, shape, dtype_bytes=dtype_size(dtype), progress=progress
        )
    finally:
        bar.close()
    doc = result_document(
        rows,
        model_label=label,
        shape=shape,
        inputs=inputs,
        settings=settings,
        device=args.device,
        dtype=dtype,
        attn=args.attn,
        argv=["leanvlm", *sys.argv[1:]] if sys.argv else None,
        skipped=skipped,
    )
    write_json(doc, args.out)
    print(
        f"model: {label} | {adapter.num_layers} layers | {doc['prompt_tokens']} prompt tokens "
        f"({doc['visual_tokens']} visual) | {args.device} {args.dtype} {args.attn}"
    )
    print(format_table(rows))
    from ..bench import timing_notes

    for line in timing_notes(rows):
        print(line)
    for config, reason in skipped:
        print(f"skipped {config}: {reason}")
    untrained = [r["config"] for r in rows if r.get("untrained_modules")]
    if untrained:
        print(
            f"untrained modules (freshly initialised; timing and FLOPs only, outputs not meaningful): "
            f"{', '.join(untrained)}"
        )
    print(
        f"\nspeedup and FLOPs ratio are relative to the unmodified model; FLOPs are real (2 per multiply-add), "
        f"whole prompt. Wrote {args.out}"
    )
    if args.plot is not None:
        path = args.plot or str(args.out).rsplit(".", 1)[0] + ".png"
        plot(rows, path, f"{label}, {args.device} {args.dtype}")
        print(f"wrote {path}")
    return 0
