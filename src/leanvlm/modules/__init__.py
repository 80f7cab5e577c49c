"""Trainable parts of methods (twig layers, ProxyV's MLPs, cross tokens, learned tokens): where they
live on a model, and how they are saved and loaded beside a base checkpoint.

``lv.prepare(model, *methods)`` builds each trainable method's modules and registers them on the model
(under ``model.leanvlm_modules``), so that an optimizer built afterwards, DDP / DeepSpeed wrapping and
``model.to(...)`` all see them. Call it before building the Trainer (or let
:class:`leanvlm.train.ReductionCallback` call it when the Trainer is built). A method reaches its
modules with :func:`modules_for`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .io import load_modules, save_modules

ATTR = "leanvlm_modules"

__all__ = ["ATTR", "attached", "load_modules", "modules_for", "prepare", "save_modules"]


def attached(model) -> nn.ModuleDict | None:
    """The modules :func:`prepare` registered on ``model`` (None if it registered none)."""
    return model._modules.get(ATTR)


def prepare(model, *methods) -> nn.ModuleDict:
    """Build and register the trainable modules of ``methods`` on ``model`` (methods without trainable
    parts are skipped; modules already registered under a method's key are kept, so calling it twice,
    or after :func:`load_modules`, does not reset trained weights). Returns the registry."""
    from ..methods.base import Method
    from ..registry import find_adapter

    for m in methods:
        if not isinstance(m, Method):
            raise ConfigError(f"prepare() takes method configs such as lv.FastV(...); got {m!r}")
    adapter = find_adapter(model)
    registry = attached(model)
    if registry is None:
        registry = nn.ModuleDict()
        model.add_module(ATTR, registry)
    reference = next(model.parameters())
    for m in methods:
        if not m.trainable:
            continue
        key = m.module_key()
        if key in registry:
            continue
        module = m.build_modules(adapter)
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"{type(m).__name__}.build_modules() returned {type(module).__name__}, not a Module"
            )
        floating = reference.dtype if reference.is_floating_point() else torch.float32
        registry[key] = module.to(device=reference.device, dtype=floating)
    return registry


def modules_for(model, method) -> nn.Module:
    """The modules of ``method`` registered on ``model``; raises if :func:`prepare` did not run."""
    registry = attached(model)
    key = method.module_key()
    if registry is None or key not in registry:
        raise ConfigError(
            f"{type(method).__name__} has trainable parts that are not on this {type(model).__name__}: call "
            f"lv.prepare(model, method) first (before building the optimizer), or lv.load_modules(model, "
            "path, method) to load trained ones"
        )
    return registry[key]
