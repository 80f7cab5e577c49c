"""Save and load trainable modules beside a base checkpoint: ``leanvlm_modules.safetensors`` (the
weights) and ``leanvlm_modules.json`` (which methods, and the shape of the model they were built for)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

WEIGHTS = "leanvlm_modules.safetensors"
CONFIG = "leanvlm_modules.json"
FORMAT = 1


def _model_shape(model) -> dict:
    from ..registry import find_adapter

    adapter = find_adapter(model)
    text = adapter.text_config
    return {
        "model_class": type(model).__name__,
        "num_layers": adapter.num_layers,
        "hidden_size": int(text.hidden_size),
        "vocab_size": int(text.vocab_size),
    }


def save_modules(model, path) -> Path | None:
    """Write the modules registered on ``model`` into the folder ``path`` (None when it has none)."""
    from safetensors.torch import save_file

    from . import attached

    registry = attached(model)
    if registry is None or len(registry) == 0:
        return None
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in registry.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    config = {"format": FORMAT, "model": _model_shape(model), "modules": sorted(registry.keys())}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder / WEIGHTS


def load_modules(model, path, *methods) -> None:
    """Register the modules of ``methods`` on ``model`` and load their weights from the folder ``path``.
    Refused, naming the difference, when the folder was written for a model of another shape or
    lacks a method's modules; a tensor of another shape is refused too (nothing is loaded then)."""
    from safetensors.torch import load_file

    from . import attached, prepare

    folder = Path(path)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"{folder} has no {CONFIG} / {WEIGHTS} (written by lv.save_modules)")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{folder / CONFIG}: format {config.get('format')!r} is not {FORMAT}")
    expected, found = config["model"], _model_shape(model)
    different = [
        f"{k}: saved {expected.get(k)!r}, this model {v!r}" for k, v in found.items() if expected.get(k) != v
    ]
    if different:
        raise ConfigError(
            f"the modules in {folder} were trained on a model of another shape ({'; '.join(different)})"
        )
    keys = [m.module_key() for m in methods if m.trainable]
    if not keys:
        raise ConfigError("load_modules() needs the trainable methods whose modules to load; none was given")
    missing = [k for k in keys if k not in config["modules"]]
    if missing:
        raise ConfigError(f"{folder} holds modules for {config['modules']}, not for {missing}")
    state = load_file(str(folder / WEIGHTS))
    before = set(attached(model).keys()) if attached(model) is not None else set()
    registry = prepare(model, *methods)
    created = [k for k in keys if k not in before]
    wanted = {name: t for name, t in registry.state_dict().items() if name.split(".", 1)[0] in keys}
    for name, tensor in wanted.items():
        if name not in state:
            raise ConfigError(f"{folder / WEIGHTS} has no tensor {name!r}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            for k in created:  # leave the model as it was: modules registered before stay
                registry.pop(k)
            raise ConfigError(
                f"{folder / WEIGHTS}: {name!r} has shape {list(state[name].shape)}, this model's {list(tensor.shape)}"
            )
    registry.load_state_dict({**registry.state_dict(), **{k: state[k] for k in wanted}})
