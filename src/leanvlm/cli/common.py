"""Arguments and helpers shared by the commands."""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


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
    name = args.dtype or ("float32" if torch.device(args.device).type == "cpu" else "bfloat16")
    args.dtype = name
    return getattr(torch, name)


def check_device(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: CUDA is not available on this machine")


def load_model(args, dtype):
    """(model, processor, label) from --model or --preset."""
    from .. import presets

    check_device(args.device)
    if args.model:
        model, processor = presets.load_pretrained(
            args.model, dtype=dtype, device=args.device, attn_implementation=args.attn
        )
        return model, processor, args.model
    model, processor = presets.build_preset(
        args.preset, attn_implementation=args.attn, dtype=dtype, device=args.device
    )
    return model, processor, f"preset {args.preset} (random weights)"


def load_images(paths: list[str]):
    from PIL import Image

    images = []
    for path in paths:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as err:
            raise ConfigError(f"--image {path!r} cannot be read as an image: {err}") from err
    return images


def parse_methods(specs: list[str]):
    """Method specs -> [(label, method or None)]; validated before any model is built."""
    from ..methods.spec import parse_method

    out = []
    for spec in specs:
        method = parse_method(spec)
        out.append(("none" if method is None else method.describe(), method))
    return out
