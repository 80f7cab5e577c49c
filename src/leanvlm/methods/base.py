"""The contract every method config follows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError, show

POSITIONS = ("auto", "original", "compact")
QUERIES = ("last", "text")


@dataclass(frozen=True)
class MergeStage:
    """Average-pool visual tokens at ``layer``: every group of ``stride`` neighbouring visual tokens of
    an image becomes one token (its hidden state the group mean) that replaces them.

    ``pool``: "1d" (consecutive tokens in raster order) or "2d" (square blocks of the image grid,
    ``stride`` a square number). ``merge_position``: "mean" (floor of the group's mean position id,
    as LLaVolta) or "first" (the first member's position id).
    """

    layer: int
    stride: int
    pool: str = "1d"
    merge_position: str = "mean"
    kind: str = "merge"


@dataclass(frozen=True)
class DropStage:
    """One rank-and-drop step inside the LLM.

    ``layer``: the first decoder layer that sees the reduced set (layers before it see every token).
    ``score_layer``: the layer whose attention, computed on its own input, ranks the visual tokens.
    ``keep``: number of visual tokens to keep given the sample's original visual-token count.
    """

    layer: int
    score_layer: int
    keep: Callable[[int], int]
    kind: str = "drop"


class Method:
    """Base of every method config (frozen dataclasses).

    Flags read by callers (never ``isinstance``):
      stage: "llm" (acts inside the language model), "vision" or "decode".
      needs_scores: ranks tokens by attention.
      changes_length: later layers see a shorter sequence.
      trainable: adds parameters that must be trained.
    """

    name: ClassVar[str]
    #: what positions="auto" means where the model allows it (the reference code's choice)
    reference_positions: ClassVar[str] = "original"
    stage: ClassVar[str] = "llm"
    needs_scores: ClassVar[bool] = False
    changes_length: ClassVar[bool] = True
    trainable: ClassVar[bool] = False

    positions: str
    query: str

    def _check_choice(self, field: str, value, allowed):
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(
                f"{type(self).__name__}: {field}={show(value)} is not one of {', '.join(map(repr, allowed))}"
            )

    @classmethod
    def bench_default(cls, num_layers: int) -> Method:
        """The setting the bench runs for budget "default" (the reference's headline setting)."""
        return cls()

    @classmethod
    def at_budget(cls, budget: float, num_layers: int) -> Method:
        """A setting whose layer-averaged visual tokens are ``budget`` of the input's (matched budgets)."""
        raise NotImplementedError

    def resolved_positions(self, compact_allowed: bool) -> str:
        """ "auto" -> the reference's choice, or "original" where the model's RoPE ids can not be renumbered."""
        if self.positions != "auto":
            return self.positions
        return self.reference_positions if compact_allowed else "original"

    def check_adapter(self, adapter) -> None:
        """Checks that need to know what the model allows (its adapter's flags); raise ConfigError."""
        if getattr(self, "positions", None) == "compact" and not adapter.supports_compact_positions:
            raise ConfigError(
                f"{type(self).__name__}: positions='compact' is not possible on {type(adapter.model).__name__} "
                "(its RoPE ids encode layout); use positions='original'"
            )

    def check_model(self, num_layers: int) -> None:
        """Checks that need the model (raise ConfigError); run by ``apply`` before anything is installed."""

    def drop_stages(self, num_layers: int) -> list[DropStage | MergeStage]:
        """The reduction steps inside the LLM, in layer order."""
        raise NotImplementedError

    @property
    def is_noop(self) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={show(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"


def early_layer_for_budget(owner: str, budget: float, num_layers: int) -> int:
    """Layer 2 (or the last one on shallower models), after checking that keeping everything before it
    still fits in ``budget`` (the share of visual tokens kept on average over the layers)."""
    layer = min(2, num_layers - 1)
    low = layer / num_layers
    if not low < budget <= 1:
        raise ConfigError(
            f"{owner}: budget={budget} is outside ({low:.3g}, 1] for layer={layer} of {num_layers}"
        )
    return layer


def check_layer(owner: str, name: str, value: int, num_layers: int) -> None:
    """A reduction layer must leave at least one layer before it and one after."""
    if not 1 <= value <= num_layers - 1:
        raise ConfigError(
            f"{owner}: {name}={show(value)} is outside [1, {num_layers - 1}] for this model ({num_layers} decoder layers)"
        )
