"""Method configs. Importing this package registers every method."""

from .base import Method
from .baselines import RandomDrop, UniformDrop
from .fastv import FastV
from .llavolta import VisualContextCompression
from .pyramiddrop import PyramidDrop

__all__ = ["FastV", "Method", "PyramidDrop", "RandomDrop", "UniformDrop", "VisualContextCompression"]
