"""Pure tensor functions: no hooks, no model knowledge."""

from .masks import build_bool_mask, gather_mask, to_layer_format
from .rope import apply_rope
from .scores import attention_to_keys, mean_query_scores
from .selection import compact_indices, topk_keep

__all__ = [
    "apply_rope",
    "attention_to_keys",
    "build_bool_mask",
    "compact_indices",
    "gather_mask",
    "mean_query_scores",
    "to_layer_format",
    "topk_keep",
]
