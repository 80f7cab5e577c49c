"""The only code that drives the decoder-layer loop."""

from .loop import Engine
from .state import KVMap, TokenState
from .trace import DecodeRecord, ScoreRecord, StageRecord, Trace

__all__ = ["DecodeRecord", "Engine", "KVMap", "ScoreRecord", "StageRecord", "TokenState", "Trace"]
