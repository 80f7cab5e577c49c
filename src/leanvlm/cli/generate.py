"""``leanvlm generate``: run a VLM with a method applied and show what each layer processed."""

from __future__ import annotations

import json
import time

import torch

from ..errors import ConfigError
from ..registry import find_adapter
from .common import (
    add_device_args,
    add_model_args,
    default_images,
    load_images,
    load_model,
    resolve_dtype,
    resolve_methods,
)

HELP = "generate text for an image with a method applied (default: a built-in demo model)"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=HELP)
    add_model_args(p, default_preset="demo")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--prompt", default="Describe this image.", help="the question about the image(s)")
    p.add_argument(
        "--method",
        default="fastv",
        help="method spec NAME[:key=value,...], e.g. 'pyramiddrop:layers=[8,16,24]' or 'none'; unset "
        "arguments take the method's defaults for the model's depth (default: %(default)s)",
    )
    p.add_argument("--compare", action="store_true", help="also run without any method and show both")
    p.add_argument("--max-new-tokens", type=int, default=16)
    add_device_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def summarize_counts(counts: list[int]) -> str:
    """[576, 576, 288, 288] -> '576 x2, 288 x2'."""
    out, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        out.append(f"{counts[i]} x{j - i}")
        i = j
    return ", ".join(out)


def run_one(model, processor, inputs, method, max_new_tokens: int) -> dict:
    import leanvlm as lv

    methods = () if method is None else (method,)
    with lv.apply(model, *methods) as applied, torch.inference_mode():
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
        start = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        if inputs["input_ids"].is_cuda:
            torch.cuda.synchronize()
        prefill_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generate_s = time.perf_counter() - start
        trace = applied.trace
        new = out[0, inputs["input_ids"].shape[1] :]
        return {
            "method": "none" if method is None else method.describe(),
            "prefill_ms": round(prefill_ms, 2),
            "generate_s": round(generate_s, 3),
            "visual_per_layer": trace.visual_per_layer[0],
            "tokens_per_layer": trace.tokens_per_layer[0],
            "output": processor.decode(new, skip_special_tokens=True),
        }


def run(args) -> int:
    from ..loading import chat_inputs
    from ..methods.spec import parse_method

    parse_method(args.method)  # validate before loading anything
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    images = load_images(args.image)
    model, processor, label = load_model(args, resolve_dtype(args))
    ((_, method),) = resolve_methods([args.method], find_adapter(model).num_layers, "generate")
    images = default_images(images, model, "generate")
    inputs = chat_inputs(processor, args.prompt, images, args.device)
    runs = [None, method] if args.compare and method is not None else [method]
    results = [run_one(model, processor, inputs, m, args.max_new_tokens) for m in runs]
    info = {
        "model": label,
        "layers": len(results[0]["visual_per_layer"]),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "runs": results,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {label} | {info['layers']} layers | {args.attn} | {args.device} {args.dtype}")
    print(
        f"prompt: {args.prompt!r} ({info['prompt_tokens']} tokens, {results[0]['visual_per_layer'][0]} visual)"
    )
    for r in results:
        print(f"\n[{r['method']}]")
        print(f"  prefill {r['prefill_ms']:.1f} ms | generate {r['generate_s']:.2f} s")
        print(f"  visual tokens per layer: {summarize_counts(r['visual_per_layer'])}")
        print(f"  output: {r['output']!r}")
    return 0
