"""Which KV caches token reduction can use, and the record of what a reduced cache holds."""

from .. import compat
from ..errors import UnsupportedModelError


def check_cache(cache) -> None:
    """Layers after a drop cache fewer entries than earlier layers; only a DynamicCache of plain
    full-attention layers lets every layer keep its own length."""
    if cache is None:
        return
    problem = compat.reducible_cache_problem(cache)
    if problem is not None:
        raise UnsupportedModelError(
            f"token reduction needs a DynamicCache of full-attention layers (each layer keeps its own "
            f"length); got {problem}. Use the default cache (no cache_implementation), or a no-op setting."
        )


_RECORD = "_leanvlm_kv_record"


def get_kv_record(cache):
    """What each stage's layers of ``cache`` hold, as recorded by the prefill that reduced it.

    The record travels with the cache object (so a deep copy of a cache, or a method removed and
    applied again, continues correctly): (tokens cached, prompt length, reduction layers,
    [KVMap per stage])."""
    return getattr(cache, _RECORD, None) if cache is not None else None


def set_kv_record(cache, record) -> None:
    if record is None:
        if hasattr(cache, _RECORD):
            delattr(cache, _RECORD)
        return
    setattr(cache, _RECORD, record)
