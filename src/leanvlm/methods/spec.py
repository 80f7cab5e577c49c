"""Parse method specs from text: ``"fastv:layer=2,keep_ratio=0.25"`` -> ``FastV(layer=2, keep_ratio=0.25)``.

Shared by the CLI, the training recipe and the evaluation plugin, so that text input gets the same
validation and error messages as the Python API; :func:`resolve_method` also sets a named method's
defaults for the model's depth.
"""

from __future__ import annotations

import ast

from ..errors import ConfigError, show
from ..registry import METHODS, get_method

__all__ = [
    "build_method",
    "get_method",
    "method_names",
    "parse_method",
    "resolve_build",
    "resolve_method",
    "split_top_level",
]


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and quotes: ``"a=1,b=[1,2]"`` -> ``["a=1", "b=[1,2]"]``."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_value(raw: str):
    """A Python literal where the text is one (``2``, ``0.5``, ``[8,16]``, ``None``), else the string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # not a literal; TypeError: "{[1]: 2}" (unhashable key); RecursionError: deeply nested brackets
        return raw


def parse_kwargs(text: str) -> dict:
    out = {}
    for item in split_top_level(text):
        if "=" not in item:
            raise ConfigError(f"method argument {item!r} is not of the form key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        if not key:
            raise ConfigError(f"method argument {item!r} has no name before '='")
        if key in out:
            raise ConfigError(f"method argument {key!r} is given twice")
        out[key] = parse_value(raw)
    return out


def build_method(name: str, kwargs: dict | None = None):
    """Instantiate the registered method ``name`` with ``kwargs``; ``"none"`` gives None."""
    if name.lower() in ("none", ""):
        if kwargs:
            raise ConfigError(f"method 'none' takes no arguments; got {', '.join(kwargs)}")
        return None
    cls = get_method(name)
    # unknown names are refused by the constructor (see register_method), with the allowed ones
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (kwargs or {}).items()}
    return cls(**kwargs)


def parse_method(spec: str):
    """``"name"`` or ``"name:key=value,key=value"`` -> a method config (None for ``"none"``)."""
    if not isinstance(spec, str):
        raise ConfigError(f"method spec {show(spec)} must be a string such as 'fastv:layer=2,keep_ratio=0.5'")
    name, _, args = spec.partition(":")
    return build_method(name.strip(), parse_kwargs(args))


def method_names() -> list[str]:
    return ["none", *sorted(METHODS)]


def resolve_method(spec: str, num_layers: int):
    """The method ``spec`` names, set for a model of ``num_layers`` decoder layers: the method's own
    default setting for that depth (:meth:`leanvlm.methods.base.Method.bench_default`, the one place
    that says how defaults scale, e.g. PyramidDrop's 8 / 16 / 24 on 32 layers becomes 2 / 4 / 6 on 8),
    with the spec's arguments on top. When the spec gives any argument the depth changed, the depth's
    defaults are left out and the spec is taken as written. ``"none"`` gives None.

    Every command resolves the method it runs this way (and prints the result), so that a name means
    the same setting in ``generate``, ``bench``, ``viz``, ``flops``, ``eval`` and ``train``."""
    if not isinstance(spec, str):
        raise ConfigError(f"method spec {show(spec)} must be a string such as 'fastv:layer=2,keep_ratio=0.5'")
    name, _, args = spec.partition(":")
    return resolve_build(name.strip(), parse_kwargs(args), num_layers)


#: the depth the methods' published defaults are set for (LLaVA-1.5-7B's Vicuna-7B)
REFERENCE_DEPTH = 32


def resolve_build(name: str, kwargs: dict, num_layers: int):
    """:func:`resolve_method` from a name and its arguments (``"none"`` gives None).

    The fields the depth changes are those where ``bench_default(num_layers)`` differs from
    ``bench_default(32)``, the depth the published defaults are set for; they are taken from the former
    unless the spec sets one of them (then the spec is taken as written)."""
    import dataclasses

    if name.lower() in ("none", ""):
        return build_method(name, kwargs)
    cls = get_method(name)
    try:
        here, reference = cls.bench_default(num_layers), cls.bench_default(REFERENCE_DEPTH)
        scaled = {
            f.name: getattr(here, f.name)
            for f in dataclasses.fields(cls)
            if f.init and getattr(here, f.name) != getattr(reference, f.name)
        }
    except (ConfigError, TypeError):  # no default fits this depth (or the method has required fields)
        scaled = {}
    if scaled.keys() & kwargs.keys():
        scaled = {}
    return build_method(name, {**scaled, **kwargs})
