"""Method configs. Importing this package registers every method."""

from .base import DropStage, Method
from .fastv import FastV
from .llavolta import VisualContextCompression
from .pyramiddrop import PyramidDrop

__all__ = ["DropStage", "FastV", "Method", "PyramidDrop", "VisualContextCompression"]
