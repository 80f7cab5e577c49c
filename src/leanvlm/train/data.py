"""LLaVA-format conversation data for fine-tuning.

A data file is a JSON list of records::

    {"image": "cat.png",                       # or a list of paths, or absent for text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Image paths are relative to ``image_folder``. Every ``<image>`` in a human turn is replaced by the
model's image placeholder (through the processor's chat template); only the assistant answers are
supervised (labels of everything else are -100).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(conversations: list[dict]) -> list[dict]:
    messages = []
    turns = list(conversations)
    while turns and ROLES.get(turns[0].get("from")) == "assistant":
        turns = turns[1:]  # a conversation starts with the user (LLaVA's preprocessing drops such turns too)
    for turn in turns:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ConfigError(f"conversation turn {turn!r}: 'from' must be one of {', '.join(ROLES)}")
        content = []
        pieces = str(turn.get("value", "")).split("<image>")
        for k, piece in enumerate(pieces):
            if k:
                content.append({"type": "image"})
            if piece.strip("\n"):
                content.append({"type": "text", "text": piece.strip("\n")})
        messages.append({"role": role, "content": content})
    return messages


def _count_images(messages: list[dict]) -> int:
    return sum(item["type"] == "image" for m in messages for item in m["content"])


class LlavaJsonDataset(torch.utils.data.Dataset):
    """Tokenized samples (input_ids, attention_mask, labels and the processor's image tensors)."""

    def __init__(
        self, path: str | Path, processor, image_folder: str | Path | None = None, max_length: int = 2048
    ):
        path = Path(path)
        try:
            self.records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"--data {str(path)!r} cannot be read as a JSON list: {err}") from err
        if not isinstance(self.records, list) or not self.records:
            raise ConfigError(f"--data {str(path)!r} must hold a non-empty JSON list of conversations")
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder else path.parent
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def _images(self, record: dict) -> list:
        from PIL import Image

        paths = record.get("image") or []
        paths = [paths] if isinstance(paths, str) else paths
        images = []
        for p in paths:
            try:
                images.append(Image.open(self.image_folder / p).convert("RGB"))
            except OSError as err:
                raise ConfigError(f"image {str(self.image_folder / p)!r} cannot be read: {err}") from err
        return images

    def _encode(self, messages: list[dict], images: list, generation_prompt: bool):
        text = self.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        kwargs = {"images": images[: _count_images(messages)]} if _count_images(messages) else {}
        return self.processor(text=text, return_tensors="pt", **kwargs)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        messages = to_messages(record.get("conversations", []))
        images = self._images(record)
        if _count_images(messages) != len(images):
            raise ConfigError(
                f"record {i}: {_count_images(messages)} <image> placeholders but {len(images)} image file(s)"
            )
        full = self._encode(messages, images, generation_prompt=False)
        ids = full["input_ids"][0]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._encode(messages[:k], images, generation_prompt=True)["input_ids"].shape[1]
            end = self._encode(messages[: k + 1], images, generation_prompt=False)["input_ids"].shape[1]
            labels[start:end] = ids[start:end]
        if not bool((labels != IGNORE_INDEX).any()):
            raise ConfigError(f"record {i} has no assistant answer to learn from")
        if ids.shape[0] > self.max_length:
            raise ConfigError(f"record {i} has {ids.shape[0]} tokens, more than max_length={self.max_length}")
        sample = {
            k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
            for k, v in full.items()
        }
        sample["labels"] = labels
        return sample


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad the token tensors; concatenate the image tensors in sample order."""
    width = max(s["input_ids"].shape[0] for s in batch)
    out = {}
    for key, fill in (
        ("input_ids", pad_token_id),
        ("attention_mask", 0),
        ("labels", IGNORE_INDEX),
        ("mm_token_type_ids", 0),
    ):
        if key in batch[0]:
            rows = [torch.nn.functional.pad(s[key], (0, width - s[key].shape[0]), value=fill) for s in batch]
            out[key] = torch.stack(rows)
    for key in ("pixel_values", "image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        present = [s[key] for s in batch if key in s]
        if not present:
            continue
        if present[0].dim() == 5:  # LLaVA-NeXT: [images, crops, C, H, W]; crops differ per image
            crops = max(t.shape[1] for t in present)
            present = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, crops - t.shape[1])) for t in present]
        out[key] = torch.cat(present)
    return out
