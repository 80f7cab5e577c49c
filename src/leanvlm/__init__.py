"""leanvlm: spend less compute on visual tokens in vision-language models."""

from . import adapters as _adapters  # noqa: F401  (registers the adapters)
from . import generation
from .api import Applied, apply, last_report, remove
from .errors import CompatError, ConfigError, IncompatibleMethodsError, LeanVLMError, UnsupportedModelError
from .methods import (
    CDPruner,
    CrossGET,
    DivPrune,
    FastV,
    Method,
    ProxyV,
    PyramidDrop,
    RandomDrop,
    SparseVLM,
    UniformDrop,
    VisionZip,
    VisualContextCompression,
)
from .methods.spec import parse_method
from .modules import load_modules, prepare, save_modules
from .registry import METHODS
from .train.schedule import StagedSchedule

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Applied",
    "CDPruner",
    "CompatError",
    "ConfigError",
    "CrossGET",
    "DivPrune",
    "FastV",
    "IncompatibleMethodsError",
    "LeanVLMError",
    "Method",
    "ProxyV",
    "PyramidDrop",
    "RandomDrop",
    "SparseVLM",
    "StagedSchedule",
    "UniformDrop",
    "UnsupportedModelError",
    "VisionZip",
    "VisualContextCompression",
    "apply",
    "generation",
    "last_report",
    "load_modules",
    "parse_method",
    "prepare",
    "remove",
    "save_modules",
]
