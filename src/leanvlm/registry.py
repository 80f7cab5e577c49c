"""One-line registration of methods and adapters. Duplicate names are rejected."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import LeanVLMError, UnsupportedModelError

if TYPE_CHECKING:
    from .adapters.base import Adapter

METHODS: dict[str, type] = {}
ADAPTERS: dict[str, type[Adapter]] = {}


def register_method(name: str):
    """Class decorator: make a method config available under ``name`` (CLI, bench, eval)."""

    def deco(cls):
        if name in METHODS:
            raise LeanVLMError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def register_adapter(cls):
    """Class decorator: register an adapter under its ``name``."""
    if cls.name in ADAPTERS:
        raise LeanVLMError(f"an adapter named {cls.name!r} is already registered")
    ADAPTERS[cls.name] = cls
    return cls


def supported_models() -> list[str]:
    return sorted(c for a in ADAPTERS.values() for c in a.model_classes)


def find_adapter(model) -> Adapter:
    """The adapter for ``model`` (a stock transformers model instance)."""
    cls_names = {c.__name__ for c in type(model).__mro__}
    for adapter_cls in ADAPTERS.values():
        if cls_names & set(adapter_cls.model_classes):
            return adapter_cls(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported; supported models: {', '.join(supported_models())}"
    )


def adapter_class(model_class_name: str) -> type[Adapter]:
    """The adapter class serving a model class, by name (no model instance needed)."""
    for adapter_cls in ADAPTERS.values():
        if model_class_name in adapter_cls.model_classes:
            return adapter_cls
    raise UnsupportedModelError(
        f"{model_class_name} is not supported; supported models: {', '.join(supported_models())}"
    )


def get_method(name: str) -> type:
    key = name.lower().replace("-", "").replace("_", "")
    for registered, cls in METHODS.items():
        if registered.replace("_", "") == key:
            return cls
    raise LeanVLMError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
