"""Model adapters. Importing this package registers every adapter."""

from .base import Adapter
from .llava import LlavaAdapter

__all__ = ["Adapter", "LlavaAdapter"]
