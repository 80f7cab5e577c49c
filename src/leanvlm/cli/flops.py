"""``leanvlm flops``: per-layer FLOPs and KV bytes for a model shape and a method, without weights."""

from __future__ import annotations

import json

import torch

from ..errors import ConfigError
from .common import DTYPES, parse_methods, resolve_methods

HELP = "print per-layer FLOPs (real and paper conventions) and KV bytes for a model and method"


def add_parser(sub) -> None:
    from ..presets import PRESET_HELP

    p = sub.add_parser("flops", help=HELP, description=HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="llava-1.5-7b", help=f"model shape: {', '.join(PRESET_HELP)}")
    g.add_argument("--model", help="checkpoint folder or hub id (only its config is read)")
    p.add_argument(
        "--method", action="append", default=[], help="method spec NAME[:key=value,...]; repeatable"
    )
    p.add_argument("--text-tokens", type=int, default=64, help="non-visual prompt tokens (default 64)")
    p.add_argument("--images", type=int, default=1, help="images in the prompt (default 1)")
    p.add_argument(
        "--dtype", default="bfloat16", choices=DTYPES, help="for KV-cache bytes (default bfloat16)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def meta_model(args):
    """The model on the meta device: the real classes and adapter, no memory for weights."""
    from transformers import AutoModelForImageTextToText

    from ..loading import load_config
    from ..presets import preset_config

    config = load_config(args.model) if args.model else preset_config(args.preset)
    with torch.device("meta"):
        if args.model:
            return AutoModelForImageTextToText.from_config(config)
        import transformers

        from ..presets import preset_model_class

        return getattr(transformers, preset_model_class(args.preset))(config)


def run(args) -> int:
    from .. import flops
    from ..registry import find_adapter

    parse_methods(args.method or ["none"])  # validated before anything is built
    if args.text_tokens < 0:
        raise ConfigError(f"--text-tokens={args.text_tokens} must be >= 0")
    if args.images < 0:
        raise ConfigError(f"--images={args.images} must be >= 0")
    model = meta_model(args)
    adapter = find_adapter(model)
    shape = type(adapter).model_shape(model.config)
    methods = resolve_methods(args.method or ["none"], adapter.num_layers, "flops", quiet=args.json)
    for _, method in methods:
        if method is not None:
            method.check_model(adapter.num_layers)
    if not shape.visual_tokens_per_image:
        raise ConfigError(f"{shape.name}: the visual-token count depends on the image; use leanvlm bench")
    n_visual = args.images * shape.visual_tokens_per_image
    dtype_bytes = flops.dtype_size(args.dtype)
    base = flops.report(
        shape,
        *flops.schedule_counts(None, adapter.num_layers, n_visual, args.text_tokens),
        images=args.images,
        dtype_bytes=dtype_bytes,
    )
    results = []
    for label, method in methods:
        tokens, visual = flops.schedule_counts(method, adapter.num_layers, n_visual, args.text_tokens, shape)
        rep = flops.report(
            shape,
            tokens,
            visual,
            images=args.images,
            dtype_bytes=dtype_bytes,
            scoring=flops.schedule_scoring(method, tokens, args.text_tokens),
            input_visual=n_visual,
            selection=flops.schedule_selection(
                method, shape, [shape.visual_tokens_per_image] * args.images, args.text_tokens
            ),
            layer_work=flops.schedule_layer_work(
                method, shape, [shape.visual_tokens_per_image] * args.images
            ),
            tower_layers=flops.schedule_tower(method, shape),
        )
        shrinks_tower = flops.schedule_tower(method, shape) is not None
        if (
            method is not None
            and method.stage in ("vision", "input")
            and not method.is_noop
            and not shrinks_tower
        ):
            rep.notes.append(
                f"{type(method).__name__}: the vision tower and projector still run on every visual token; 'selection' is "
                "the method's own work before the LLM"
            )
        results.append((label, rep))
    if args.json:
        out = {
            "model": args.model or args.preset,
            "text_tokens": args.text_tokens,
            "images": args.images,
            "visual_tokens": n_visual,
            "dtype": args.dtype,
            "methods": [
                {
                    "method": label,
                    **rep.summary(),
                    "real_ratio": rep.prefill_total / base.prefill_total,
                    "llm_ratio": rep.llm / base.llm,
                    "paper_ratio": rep.paper_total / base.paper_total if base.paper_total else None,
                    "layers": [
                        {
                            "layer": lf.layer,
                            "tokens": lf.tokens,
                            "visual": lf.visual,
                            "real": lf.total,
                            "paper": lf.paper,
                        }
                        for lf in rep.layers
                    ],
                }
                for label, rep in results
            ],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"model: {args.model or args.preset} | {adapter.num_layers} layers | {n_visual} visual + "
        f"{args.text_tokens} text tokens | KV in {args.dtype}"
    )
    for label, rep in results:
        print(f"\n== {label} ==")
        print(rep.table())
        if base.paper_total:
            print(
                f"vs. no method: real {rep.prefill_total / base.prefill_total:.1%} (LLM layers "
                f"{rep.llm / base.llm:.1%}), "
                f"paper {rep.paper_total / base.paper_total:.1%}, "
                f"KV {rep.kv_bytes / base.kv_bytes:.1%}"
            )
    return 0
