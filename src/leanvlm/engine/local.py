"""Small pieces of the engine's bookkeeping: per-thread attributes, hook removal by id, the prompt."""

from __future__ import annotations

import torch

from ..errors import ConfigError


class PerThread:
    """An engine attribute that each thread sees on its own: the state of the forward call a thread is
    running (and its trace), so that threads sharing one applied model never see each other's calls."""

    def __init__(self, default=None, factory=None):
        self.default, self.factory = default, factory

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, engine, owner=None):
        if engine is None:
            return self
        local = engine._local
        if not hasattr(local, self.name):
            setattr(local, self.name, self.factory(engine) if self.factory else self.default)
        return getattr(local, self.name)

    def __set__(self, engine, value):
        setattr(engine._local, self.name, value)


def remove_hook(module: torch.nn.Module, kind: str, hook_id: int) -> None:
    """Remove hook ``hook_id`` from ``module`` (what torch's RemovableHandle does; kept by id so that a
    deep copy of the model, whose hooks carry the same ids, can remove its own)."""
    names = (
        ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
        if kind == "pre"
        else ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    )
    for name in names:
        getattr(module, name, {}).pop(hook_id, None)


def prompt_length_of(declared: int | None, n: int, valid: torch.Tensor) -> int:
    """The prompt the query rows come from: ``prompt_length(n)`` / generate()'s input, else everything."""
    if declared is None:
        return n
    prompt_len = min(declared, n)
    has_tokens = valid.any(-1)
    in_prompt = valid[:, :prompt_len].any(-1)
    bad = (has_tokens & ~in_prompt).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        first = int(valid[row].nonzero()[0, 0])
        raise ConfigError(
            f"prompt_length({declared}): sample {row} has no token in its first {prompt_len} "
            f"positions (its first real token is at position {first}, after left padding); count the "
            "padding in, i.e. use the padded prompt length"
        )
    return prompt_len
