"""Tiny models built from configs for the method x adapter matrix, and their inputs.

Each adapter entry builds a model with random weights and its processor (for Qwen-VL a stand-in
that expands placeholders and adds mm_token_type_ids, since the real processor class needs
torchvision). Inputs are left-padded batches of (prompt text, number of images); image sizes
differ per prompt so that AnyRes / dynamic-resolution models get different visual counts per sample.
"""

from __future__ import annotations

import copy
import functools

import torch

import leanvlm as lv
from leanvlm.presets import build_preset, chat_prompt, demo_image
from leanvlm.registry import find_adapter

ADAPTERS = ["llava", "llava-next", "qwen2-vl", "qwen2.5-vl"]
PRESET = {
    "llava": "tiny",
    "llava-next": "tiny-llava-next",
    "qwen2-vl": "tiny-qwen2-vl",
    "qwen2.5-vl": "tiny-qwen2.5-vl",
}


@functools.cache
def _build(adapter: str, attn: str, num_layers: int, image_size: int | None):
    shape = {"num_layers": num_layers}
    if image_size is not None:
        shape["image_size"] = image_size
    model, proc = build_preset(PRESET[adapter], attn_implementation=attn, seed=0, **shape)
    # A larger init spread than the default 0.02 makes attention less uniform, so rankings are
    # decided by clear margins rather than by float noise.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model, proc


def build(adapter: str, attn: str = "sdpa", num_layers: int = 5, image_size: int | None = None):
    return _build(adapter, attn, num_layers, image_size)


@functools.cache
def _prepared(method, adapter: str, attn: str, num_layers: int):
    model, proc = _build(adapter, attn, num_layers, None)
    model = copy.deepcopy(model)
    torch.manual_seed(0)  # the same trainable modules on every copy (eager and sdpa ones alike)
    lv.prepare(model, method)
    return model, proc


def build_for(method, adapter: str, attn: str = "sdpa", num_layers: int = 5):
    """``build``, plus the method's trainable modules attached (on a copy) when it has any."""
    if not method.trainable:
        return build(adapter, attn, num_layers)
    return _prepared(method, adapter, attn, num_layers)


def image_for(text: str, j: int, size: int | None):
    """Each image is fixed by its prompt, so a sample gets the same pixels alone and in a batch."""
    seed = sum(map(ord, text)) + j
    side = size or (56, 84, 112)[seed % 3]
    return demo_image(side, seed=seed)


def make_inputs(proc, items: list[tuple[str, int]], image_size: int | None = None):
    """items: (text, n_images) per sample. Returns a left-padded batch."""
    texts = [chat_prompt(proc, t, k) for t, k in items]
    images = [image_for(t, j, image_size) for t, k in items for j in range(k)]
    kwargs = {"images": images} if images else {}
    return proc(text=texts, padding=True, return_tensors="pt", **kwargs)


def visual_counts(model, inputs) -> list[int]:
    return find_adapter(model).visual_mask(inputs["input_ids"], None).sum(-1).tolist()


PROMPTS = [
    ("What is shown in this image?", 1),
    ("Describe the picture in detail and say how many people are in the photo.", 1),
    ("Read the text on the sign.", 0),
    ("What color is the car in the two pictures?", 2),
]


def llm_input(model, inputs) -> torch.Tensor:
    """The stock model's ``inputs_embeds`` at the language model's input (image features merged in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].detach().clone())

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["embeds"]
