"""Plumbing that runs methods' plans through a stock transformers forward (no method algorithm)."""

from .context import Context, VisionContext
from .edits import Insert, Keep, Merge
from .plan import Replace, Step, Vision, VisionRun
from .session import Engine
from .state import KVMap, TokenState
from .trace import DecodeRecord, ScoreRecord, StageRecord, Trace

__all__ = [
    "Context",
    "DecodeRecord",
    "Engine",
    "Insert",
    "KVMap",
    "Keep",
    "Merge",
    "Replace",
    "ScoreRecord",
    "StageRecord",
    "Step",
    "TokenState",
    "Trace",
    "Vision",
    "VisionRun",
    "VisionContext",
]
