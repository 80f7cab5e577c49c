"""One-line registration of methods and adapters. Duplicate names are rejected."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

from .errors import ConfigError, LeanVLMError, UnsupportedModelError, show

if TYPE_CHECKING:
    from .adapters.base import Adapter

METHODS: dict[str, type] = {}
ADAPTERS: dict[str, type[Adapter]] = {}


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register_method(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: make a method config available under ``name`` (CLI, bench, eval).

    :func:`get_method` also finds it by its class name and by ``aliases`` (case-insensitive, ``-`` and
    ``_`` ignored). Its constructor refuses unknown arguments (and too many positional ones) with a
    :class:`ConfigError` that lists the allowed ones.
    """

    def deco(cls):
        if isinstance(aliases, str):
            raise LeanVLMError(f"register_method: aliases={aliases!r} must be a tuple of names")
        taken = {_normalize(n): owner for owner in METHODS.values() for n in _lookup_names(owner)}
        for n in (name, cls.__name__, *aliases):
            if _normalize(n) in taken:
                raise LeanVLMError(
                    f"a method named {n!r} is already registered ({taken[_normalize(n)].__name__})"
                )
        cls.name = name
        cls.aliases = tuple(aliases)
        _check_arguments(cls)
        METHODS[name] = cls
        return cls

    return deco


def _lookup_names(cls) -> tuple[str, ...]:
    return (cls.name, cls.__name__, *getattr(cls, "aliases", ()))


def _check_arguments(cls) -> None:
    """Wrap ``cls.__init__`` (the dataclass-generated one) so that bad argument names or counts raise
    ConfigError naming them, instead of a bare TypeError."""
    init = cls.__init__
    signature = inspect.signature(init)
    params = list(signature.parameters.values())[1:]  # without self
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in params if p.kind in kinds]
    named = [p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    owner = cls.__name__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in named]
        if unknown:
            raise ConfigError(
                f"{owner}: unknown argument(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(named))}"
            )
        if len(args) > len(positional) and not var_positional:
            raise ConfigError(
                f"{owner}: takes at most {len(positional)} positional argument(s) "
                f"({', '.join(positional)}); got {len(args)}: {show(args)}"
            )
        twice = [n for n in positional[: len(args)] if n in kwargs]
        if twice:
            raise ConfigError(f"{owner}: argument(s) {', '.join(twice)} given both by position and by name")
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as err:  # e.g. a required argument left out
            raise ConfigError(f"{owner}: {err}") from None
        init(self, *args, **kwargs)

    cls.__init__ = __init__


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
    """The registered method called ``name``: its registered name, class name or an alias
    (case-insensitive, ``-`` and ``_`` ignored)."""
    if not isinstance(name, str):
        raise ConfigError(f"method name {show(name)} must be a string; registered methods: {_known()}")
    key = _normalize(name)
    for cls in METHODS.values():
        if key in {_normalize(n) for n in _lookup_names(cls)}:
            return cls
    raise ConfigError(f"unknown method {show(name)}; registered methods: {_known()}")


def _known() -> str:
    names = ", ".join(sorted(METHODS))
    aliases = sorted(a for cls in METHODS.values() for a in getattr(cls, "aliases", ()))
    return f"{names} (aliases: {', '.join(aliases)})" if aliases else names
