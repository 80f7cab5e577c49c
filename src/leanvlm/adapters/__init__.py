"""Model adapters. Importing this package registers every adapter."""

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import QwenVLAdapter

__all__ = ["Adapter", "LlavaAdapter", "LlavaNextAdapter", "QwenVLAdapter"]
