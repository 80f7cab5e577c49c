"""``leanvlm viz``: one PNG per reduction stage showing which image patches survive."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .common import (
    add_device_args,
    add_model_args,
    default_images,
    load_images,
    load_model,
    resolve_dtype,
    resolve_methods,
)

HELP = "write a PNG per reduction stage showing which image patches a method keeps"


def add_parser(sub) -> None:
    p = sub.add_parser("viz", help=HELP, description=HELP)
    add_model_args(p, default_preset="bench-cpu")
    p.add_argument(
        "--image", action="append", default=[], help="image file; repeat for several (default: synthetic)"
    )
    p.add_argument(
        "--prompt", default="Describe the picture in detail.", help="the question (it steers the ranking)"
    )
    p.add_argument(
        "--method", default="pyramiddrop", help="method spec NAME[:key=value,...] (default: %(default)s)"
    )
    p.add_argument("--out", default="leanvlm-viz", help="output folder (default: %(default)s)")
    p.add_argument("--size", type=int, default=336, help="side of each image panel in pixels (default 336)")
    add_device_args(p)


def run(args) -> int:
    import leanvlm as lv

    from ..loading import chat_inputs
    from ..methods.spec import parse_method
    from ..registry import find_adapter
    from ..viz import write_stage_pngs

    if parse_method(args.method) is None:  # validated before anything is loaded
        raise ConfigError("--method none drops nothing; name a method, e.g. --method fastv")
    if args.size < 16:
        raise ConfigError(f"--size={args.size} must be >= 16")
    images = load_images(args.image)
    model, processor, label = load_model(args, resolve_dtype(args))
    ((_, method),) = resolve_methods([args.method], find_adapter(model).num_layers, "viz")
    images = default_images(images, model, "viz")
    inputs = chat_inputs(processor, args.prompt, images, args.device)
    with lv.apply(model, method) as applied, torch.inference_mode():
        model(**inputs, logits_to_keep=1)
        print(f"model: {label} | method: {method.describe()}")
        write_stage_pngs(
            applied.trace,
            applied.adapter.image_grids(inputs),
            applied.adapter.model_view(inputs, processor),
            args.out,
            size=args.size,
            log=print,
        )
    return 0
