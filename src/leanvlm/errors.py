"""Exceptions raised by leanvlm. Every user error names the argument, the bad value and what is allowed."""


class LeanVLMError(Exception):
    """Base class of every error leanvlm raises on purpose."""


class ConfigError(LeanVLMError, ValueError):
    """A method configuration is invalid (on its own, or for the model it is applied to)."""


class UnsupportedModelError(LeanVLMError, TypeError):
    """The model (or a method on this model) is not supported."""


class IncompatibleMethodsError(LeanVLMError):
    """Methods that cannot be applied together, or a model that already has methods applied."""


def check_range(owner: str, name: str, value, low, high, *, low_open: bool = False, high_open: bool = False):
    """Raise ConfigError unless ``low <(=) value <(=) high``; the message shows the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}: {name}={value!r} must be a number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{owner}: {name}={value!r} is outside {interval}")
