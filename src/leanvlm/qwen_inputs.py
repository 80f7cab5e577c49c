"""Inputs for Qwen2-VL / Qwen2.5-VL without their processor class.

transformers' ``Qwen2VLProcessor`` cannot be built where torchvision is absent (its video processor
fails to import), yet the image processor works. :class:`QwenVLInputs` does the processor's other
job: it expands each ``<|image_pad|>`` placeholder to the image's number of visual tokens and adds
``mm_token_type_ids`` (without which Qwen2.5-VL silently uses 1-D positions). It is used for the
built-in presets and tests; real checkpoints go through ``AutoProcessor`` where it can be built.
"""

from __future__ import annotations

import torch

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class QwenVLInputs:
    """A processor stand-in: ``__call__(images=..., text=...)``, ``apply_chat_template``, ``decode``."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor, merge_size: int = 2):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = merge_size
        self.chat_template = QWEN_CHAT_TEMPLATE
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def __call__(self, images=None, text=None, return_tensors="pt", padding=False, **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        data = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            data.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            counts = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
            expanded, k = [], 0
            for t in texts:
                parts = t.split(self.image_token)
                out = parts[0]
                for part in parts[1:]:
                    out += self.image_token * counts[k] + part
                    k += 1
                expanded.append(out)
            if k != len(counts):
                raise ValueError(f"{k} image placeholders in the text but {len(counts)} images")
            texts = expanded
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=padding or len(texts) > 1, add_special_tokens=False
        )
        ids = enc["input_ids"]
        data.update(
            input_ids=ids,
            attention_mask=enc["attention_mask"],
            mm_token_type_ids=(ids == self.image_token_id).to(torch.int32),
        )
        return BatchFeature(data, tensor_type=return_tensors)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def save_pretrained(self, path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
