"""Method configs. Importing this package registers every method."""

from .base import Method
from .fastv import FastV
from .llavolta import VisualContextCompression
from .pyramiddrop import PyramidDrop

__all__ = ["FastV", "Method", "PyramidDrop", "VisualContextCompression"]
