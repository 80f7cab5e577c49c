"""Tiny models built from configs for the method x adapter matrix, and their inputs.

Each adapter entry builds a model with random weights plus a function that turns a list of
(prompt text, number of images) into processor outputs, left-padded.
"""

from __future__ import annotations

import functools

import torch

from leanvlm.presets import demo_image, tiny_llava

ADAPTERS = ["llava"]


@functools.cache
def _llava(attn: str, num_layers: int, image_size: int):
    # A larger init spread than the default 0.02 makes attention less uniform, so rankings are
    # decided by clear margins rather than by float noise.
    model, proc = tiny_llava(num_layers=num_layers, image_size=image_size, attn_implementation=attn, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model, proc


def build(adapter: str, attn: str = "sdpa", num_layers: int = 5, image_size: int = 56):
    if adapter == "llava":
        return _llava(attn, num_layers, image_size)
    raise KeyError(adapter)


def chat_prompt(proc, text: str, n_images: int) -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def make_inputs(proc, items: list[tuple[str, int]], image_size: int = 56):
    """items: (text, n_images) per sample. Returns a left-padded batch."""
    texts = [chat_prompt(proc, t, k) for t, k in items]
    # Each image is fixed by its prompt, so a sample gets the same pixels alone and in a batch.
    images = [demo_image(image_size, seed=sum(map(ord, t)) + j) for t, k in items for j in range(k)]
    kwargs = {"images": images} if images else {}
    return proc(text=texts, padding=True, return_tensors="pt", **kwargs)


PROMPTS = [
    ("What is shown in this image?", 1),
    ("Describe the picture in detail and say how many people are in the photo.", 1),
    ("Read the text on the sign.", 0),
    ("What color is the car in the two pictures?", 2),
]
