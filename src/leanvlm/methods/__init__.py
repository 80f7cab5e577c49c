"""Method configs. Importing this package registers every method."""

from .base import Method
from .baselines import RandomDrop, UniformDrop
from .cdpruner import CDPruner
from .crossget import CrossGET
from .divprune import DivPrune
from .fastv import FastV
from .llavolta import VisualContextCompression
from .proxyv import ProxyV
from .pyramiddrop import PyramidDrop
from .sparsevlm import SparseVLM
from .visionzip import VisionZip

__all__ = [
    "CDPruner",
    "CrossGET",
    "DivPrune",
    "FastV",
    "Method",
    "ProxyV",
    "PyramidDrop",
    "RandomDrop",
    "SparseVLM",
    "UniformDrop",
    "VisionZip",
    "VisualContextCompression",
]
