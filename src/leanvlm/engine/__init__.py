"""The only code that drives the decoder-layer loop."""

from .loop import Engine
from .state import KVMap, TokenState
from .trace import ScoreRecord, StageRecord, Trace

__all__ = ["Engine", "KVMap", "ScoreRecord", "StageRecord", "TokenState", "Trace"]
