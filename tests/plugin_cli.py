"""Imported by ``leanvlm train --import plugin_cli`` in tests: registers the test-only trainable method."""

from plugin_trainable import LearnedTokens

from leanvlm.registry import register_method

register_method("learned-tokens")(LearnedTokens)
