"""Arguments and helpers shared by the commands."""

from __future__ import annotations

import torch

from ..loading import DTYPES  # noqa: F401  (the choices of --dtype)


def add_model_args(p, *, default_preset: str | None) -> None:
    from ..presets import PRESET_HELP

    presets = ", ".join(f"{k} ({v})" for k, v in PRESET_HELP.items())
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=default_preset, help=f"model shape with random weights: {presets}")
    g.add_argument("--model", help="checkpoint folder or hub id (real weights)")


def add_device_args(p) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])


def resolve_dtype(args) -> torch.dtype:
    """``--dtype``, or the device's default (float32 on the CPU, bfloat16 on a GPU); sets ``args.dtype``."""
    from ..loading import resolve_dtype as resolve

    dtype = resolve(args.dtype, args.device)
    args.dtype = str(dtype).replace("torch.", "")
    return dtype


def check_device(device: str) -> None:
    from ..loading import check_device as check

    check(device)


def load_model(args, dtype):
    """(model, processor, label) from --model or --preset (:func:`leanvlm.loading.load_model`)."""
    from ..loading import load_model as load

    return load(args.model, args.preset, dtype=dtype, device=args.device, attn=args.attn)


def load_images(paths: list[str]):
    from ..loading import load_images as load

    return load(paths)


def default_images(images: list, model, command: str) -> list:
    """``images``, or one synthetic picture when none was given (said on stderr: it is not a photo)."""
    import sys

    from ..presets import demo_image

    if images:
        return images
    size = getattr(getattr(model.config, "vision_config", None), "image_size", 336)
    size = size if isinstance(size, int) else 336
    print(f"leanvlm {command}: no --image given: using a synthetic {size}x{size} picture", file=sys.stderr)
    return [demo_image(size)]


def resolve_methods(specs: list[str], num_layers: int, command: str, quiet: bool = False) -> list:
    """[(label, method or None)] for a model of ``num_layers`` layers (:func:`resolve_method`), each
    resolved setting printed to stderr."""
    import sys

    from ..methods.spec import resolve_method

    out = []
    for spec in specs:
        method = resolve_method(spec, num_layers)
        label = "none" if method is None else method.describe()
        if not quiet and method is not None:
            print(f"leanvlm {command}: {spec} -> {label}", file=sys.stderr)
        out.append((label, method))
    return out


def parse_methods(specs: list[str]):
    """Method specs -> [(label, method or None)]; validated before any model is built."""
    from ..methods.spec import parse_method

    out = []
    for spec in specs:
        method = parse_method(spec)
        out.append(("none" if method is None else method.describe(), method))
    return out
