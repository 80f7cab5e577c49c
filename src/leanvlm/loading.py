"""Loading, in one place: models (a real checkpoint or a built-in preset), processors, images and the
chat prompt. The command line, the bench, the evaluation plugin and the training recipe all call these.

Loading problems become one-line :class:`leanvlm.ConfigError` / :class:`leanvlm.UnsupportedModelError`
messages naming what to do (a folder that does not exist, a model class no adapter serves, CUDA asked
for on a machine without it)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigError, UnsupportedModelError

DTYPES = ("float32", "bfloat16", "float16")

__all__ = [
    "DTYPES",
    "chat_inputs",
    "chat_prompt",
    "check_device",
    "load_images",
    "load_config",
    "load_model",
    "load_pretrained",
    "attach_saved_modules",
    "saved_modules",
    "load_processor",
    "resolve_dtype",
]


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """``dtype`` by name, or the default: float32 on the CPU, bfloat16 on a GPU."""
    check_device(device)
    name = dtype or ("float32" if torch.device(device).type == "cpu" else "bfloat16")
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def looks_local(path_or_id: str) -> bool:
    return path_or_id.startswith((".", "/", "~")) or Path(path_or_id).exists() or path_or_id.count("/") > 1


def load_config(path_or_id: str, *, supported: bool = True):
    """A checkpoint's config, refused in one line when the folder does not exist, it can not be read, or
    (``supported``) no adapter serves its model class."""
    from transformers import AutoConfig

    if looks_local(path_or_id):
        if not Path(path_or_id).expanduser().is_dir():
            raise ConfigError(
                f"--model {path_or_id!r}: no such folder (give a checkpoint folder or a hub id)"
            )
        path_or_id = str(Path(path_or_id).expanduser())
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--model {path_or_id!r} can not be loaded: {first}") from None
    if supported:
        _check_supported(path_or_id, config)
    return config


def _check_supported(path_or_id: str, config) -> None:
    from .registry import supported_models

    supported = supported_models()
    names = list(getattr(config, "architectures", None) or [])
    if not names:  # a config saved without its class: the class transformers builds for its model type
        from . import compat

        names = [compat.image_text_to_text_class(getattr(config, "model_type", ""))]
    if not any(n in supported for n in names):
        found = ", ".join(names) or f"model type {getattr(config, 'model_type', '?')!r}"
        raise UnsupportedModelError(
            f"--model {path_or_id!r} is a {found}, which leanvlm does not support; supported: "
            f"{', '.join(supported)}"
        )


def load_processor(path_or_id: str, config=None):
    """The checkpoint's processor; where its class can not be built here (Qwen-VL's needs torchvision),
    the stand-in the model's adapter builds (:meth:`leanvlm.adapters.base.Adapter.processor_without_torchvision`)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path_or_id)
    except (ImportError, OSError, ValueError, TypeError) as err:
        adapter = _adapter_class(config)
        try:
            if adapter is None:
                raise err
            return adapter.processor_without_torchvision(path_or_id, config, err)
        except (ImportError, OSError, ValueError, TypeError) as final:
            first = str(final).strip().splitlines()[0] if str(final).strip() else type(final).__name__
            raise ConfigError(f"--model {path_or_id!r}: its processor can not be loaded: {first}") from None


def _adapter_class(config):
    """The adapter class serving the checkpoint's model class (None when none does)."""
    from .registry import ADAPTERS

    names = set(getattr(config, "architectures", None) or [])
    return next((a for a in ADAPTERS.values() if names & set(a.model_classes)), None)


def saved_chat_template(path_or_id: str) -> str | None:
    """The processor's chat template saved with the checkpoint (``chat_template.jinja`` / ``.json``)."""
    import json

    folder = Path(path_or_id)
    if not folder.is_dir():
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(path_or_id, "config.json")).parent
        except Exception:  # noqa: BLE001  (no hub: the tokenizer's template, if any, is used)
            return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def load_pretrained(
    path_or_id: str, *, dtype=None, device: str = "cpu", attn_implementation: str = "sdpa", processor=True
):
    """A real checkpoint (a local folder or a hub id) and its processor; refused in one line when the
    folder does not exist or no adapter serves the model's class."""
    from transformers import AutoModelForImageTextToText

    check_device(device)
    config = load_config(path_or_id)
    if looks_local(path_or_id):
        path_or_id = str(Path(path_or_id).expanduser())
    model = AutoModelForImageTextToText.from_pretrained(
        path_or_id, dtype=dtype or "auto", device_map=device, attn_implementation=attn_implementation
    )
    model.eval()
    return model, (load_processor(path_or_id, config) if processor else None)


def load_model(
    model: str | None = None,
    preset: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn: str = "sdpa",
):
    """(model, processor, label) from a checkpoint (``model``) or a built-in preset with random weights."""
    from . import presets

    check_device(device)
    if model:
        loaded, processor = load_pretrained(model, dtype=dtype, device=device, attn_implementation=attn)
        return loaded, processor, model
    built, processor = presets.build_preset(preset, attn_implementation=attn, dtype=dtype, device=device)
    return built, processor, f"preset {preset} (random weights)"


def saved_modules(folder, methods) -> bool:
    """Whether the checkpoint folder ``folder`` holds trained modules (``lv.save_modules``) of every
    trainable method in ``methods`` (and at least one of them is trainable)."""
    import json

    from .modules.io import CONFIG

    trainable = [m for m in methods if m is not None and m.trainable]
    path = Path(str(folder)).expanduser() / CONFIG if folder else None
    if not trainable or path is None or not path.is_file():
        return False
    saved = json.loads(path.read_text()).get("modules", [])
    return all(m.module_key() in saved for m in trainable)


def attach_saved_modules(model, folder, methods) -> bool:
    """Load the trained modules of ``methods`` saved beside the checkpoint ``folder``, when it holds them
    (a ``leanvlm train`` output); returns whether it did."""
    from .modules import load_modules

    if not saved_modules(folder, methods):
        return False
    load_modules(
        model, str(Path(str(folder)).expanduser()), *[m for m in methods if m is not None and m.trainable]
    )
    return True


def load_images(paths: list[str]):
    """The images at ``paths`` as RGB PIL images; an unreadable one is refused, naming it."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as err:
            raise ConfigError(f"--image {path!r} cannot be read as an image: {err}") from err
    return images


def chat_prompt(processor, prompt: str, n_images: int) -> str:
    """One user turn: ``n_images`` image placeholders, then ``prompt``, through the processor's chat
    template (which puts the placeholders where the model expects them); without a template, the image
    token on a line of its own per image."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    return (processor.image_token + "\n") * n_images + prompt


def chat_inputs(processor, prompt: str | list[str], images: list, device="cpu"):
    """Processor outputs for one user turn with ``images`` followed by ``prompt``; or, with a list of
    prompts and a list of image lists, a left-padded batch of such turns."""
    if isinstance(prompt, str):
        prompt, images = [prompt], [images]
    texts = [chat_prompt(processor, p, len(imgs)) for p, imgs in zip(prompt, images, strict=True)]
    flat = [img for imgs in images for img in imgs]
    batch = {"text": texts, "padding": True} if len(texts) > 1 else {"text": texts[0]}
    return processor(images=flat or None, return_tensors="pt", **batch).to(device)
