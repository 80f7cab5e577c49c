"""Exceptions raised by leanvlm. Every user error names the argument, the bad value and what is allowed."""

import math


class LeanVLMError(Exception):
    """Base class of every error leanvlm raises on purpose."""


class ConfigError(LeanVLMError, ValueError):
    """A method configuration is invalid (on its own, or for the model it is applied to)."""


class UnsupportedModelError(LeanVLMError, TypeError):
    """The model (or a method on this model) is not supported."""


class CompatError(LeanVLMError, RuntimeError):
    """The installed transformers does not have an internal leanvlm relies on (the message names the
    installed version and the supported range)."""


class IncompatibleMethodsError(LeanVLMError):
    """Methods that cannot be applied together, or a model that already has methods applied."""


def show(value) -> str:
    """``repr(value)`` for error messages, shortened where it is long (and never raising: an int too
    large for ``repr`` is shown by its size)."""
    try:
        text = repr(value)
    except ValueError:  # int above sys.get_int_max_str_digits()
        return (
            f"<int of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
        )
    return text if len(text) <= 200 else f"{text[:160]}...{text[-30:]}"


def is_int(value) -> bool:
    """An int, not a bool (``True`` is an int to Python, never a layer or a count to leanvlm)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(owner: str, name: str, value, low, high, *, low_open: bool = False, high_open: bool = False):
    """Raise ConfigError unless ``value`` is a finite number with ``low <(=) value <(=) high``; the
    message shows the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}: {name}={show(value)} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{owner}: {name}={show(value)} must be a finite number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{owner}: {name}={show(value)} is outside {interval}")
