"""Which KV caches token reduction can use."""

from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import UnsupportedModelError


def check_cache(cache) -> None:
    """Layers after a drop cache fewer entries than earlier layers; only a DynamicCache of plain
    full-attention layers lets every layer keep its own length."""
    if cache is None:
        return
    bad = [type(layer).__name__ for layer in getattr(cache, "layers", []) if type(layer) is not DynamicLayer]
    if not isinstance(cache, DynamicCache) or bad:
        kinds = f" with {', '.join(sorted(set(bad)))}" if bad else ""
        raise UnsupportedModelError(
            f"token reduction needs a DynamicCache of full-attention layers (each layer keeps its own "
            f"length); got {type(cache).__name__}{kinds}. Use the default cache (no cache_implementation)."
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
