"""The contract every method config follows."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..errors import ConfigError, show

POSITIONS = ("auto", "original", "compact")
QUERIES = ("last", "text")
#: where a method acts, in the order methods run
STAGES = ("vision", "input", "llm", "decode")
INSTALLABLE_STAGES = ("vision", "input", "llm", "decode")
#: what a method may declare it needs; the engine provides these
NEEDS = ("scores", "image_ids", "vision")


class Method:
    """Base of every method config (frozen dataclasses). A method's file holds its whole algorithm:
    :meth:`plan` hands the engine steps (:class:`leanvlm.engine.plan.Step` / ``Replace``) whose edits
    are generic (:mod:`leanvlm.engine.edits`).

    Flags read by callers (never ``isinstance``):
      stage: where it acts: "vision" (inside the vision tower), "input" (the LLM's input, before any
        layer), "llm" (inside the language model) or "decode"; ``apply`` orders methods by it and
        refuses a stage the engine cannot install.
      needs: what the engine must provide (``NEEDS``); ``apply`` refuses an unknown need.
      changes_length: later layers see a different number of tokens (the cache holds stages); a plan
        with steps from a method that declares False is refused.
      trainable: has parameters of its own (``build_modules``), attached by ``lv.prepare`` before the
        optimizer is built; ``apply`` refuses it on a model they were not attached to, unless it
        declares ``requires_modules = False``.
      composes: may share its stage with another method (default: one method per stage).
    """

    name: ClassVar[str]
    #: what positions="auto" means where the model allows it (the reference code's choice)
    reference_positions: ClassVar[str] = "original"
    stage: ClassVar[str] = "llm"
    needs: ClassVar[tuple[str, ...]] = ()
    changes_length: ClassVar[bool] = True
    trainable: ClassVar[bool] = False
    #: a trainable method that can not run without its modules (False: it runs untrained without them,
    #: e.g. CrossGET with zero offsets)
    requires_modules: ClassVar[bool] = True
    composes: ClassVar[bool] = False

    positions: str
    query: str

    def _check_choice(self, field: str, value, allowed):
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(
                f"{type(self).__name__}: {field}={show(value)} is not one of {', '.join(map(repr, allowed))}"
            )

    @classmethod
    def bench_default(cls, num_layers: int) -> Method:
        """The method's default setting on a model of ``num_layers`` decoder layers: ``cls()`` where it
        fits, its layers scaled to the depth where not. The one place that says how a method's defaults
        scale; every command resolves a method name through it (:func:`leanvlm.methods.spec.resolve_method`),
        and it is the bench's budget "default"."""
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

    def module_key(self) -> str:
        """Where a trainable method's modules live on a model (``model.leanvlm_modules[key]``); settings
        of one method share them (a schedule trains one set)."""
        return type(self).__name__

    def build_modules(self, adapter):
        """A trainable method's fresh modules (an ``nn.Module``) for the model behind ``adapter``."""
        raise NotImplementedError(f"{type(self).__name__} declares trainable=True but builds no modules")

    def decode(self, model, input_ids, stock, **kwargs):
        """A decoding-stage method's loop, called by stock ``generate()`` (``leanvlm.generation``) with
        what transformers prepared; ``stock(input_ids, **kwargs)`` runs transformers' own loop."""
        raise NotImplementedError(f"{type(self).__name__} declares stage='decode' but has no decode()")

    def plan(self, adapter) -> list:
        """The steps the engine runs (checked when applied); only called on a setting that is not a no-op."""
        if self.stage == "decode":
            return []  # a decoding-stage method acts through decode()
        raise NotImplementedError

    def visual_schedule(self, num_layers: int, images: list[int]) -> list[int]:
        """Visual tokens each decoder layer processes for one sample whose images have ``images`` visual
        tokens each (what the FLOPs formula assumes; the trace must match it). Methods that change no
        lengths process them all."""
        if not self.changes_length:
            return [sum(images)] * num_layers
        raise NotImplementedError(f"{type(self).__name__} changes lengths but declares no visual_schedule()")

    def scoring_layers(self, num_layers: int) -> list[int]:
        """The layers whose input an attention ranking is computed on (FLOPs of the ranking)."""
        return []

    def selection_flops(self, shape, images: list[int], text_tokens: int) -> int:
        """FLOPs of selection work outside the layers (``ctx.add_cost``) for one sample of a model of
        ``shape`` (:class:`leanvlm.flops.ModelShape`) whose images have ``images`` visual tokens each and
        whose prompt has ``text_tokens`` text tokens (what ``leanvlm flops`` counts without running the
        model; the trace must match it)."""
        return 0

    def layer_work(self, shape, images: list[int]) -> list[tuple[int, int, int]] | None:
        """Per decoder layer, for one sample whose images have ``images`` visual tokens each: (tokens that
        give only keys and values, tokens processed beyond the sequence's own, FLOPs of the method's
        modules) where a runner computes the layer in a split form; None when none does (what
        ``leanvlm flops`` counts; the trace's ``layer_work`` must match it)."""
        return None

    def tower_schedule(self, vision) -> list[tuple[int, int]] | None:
        """Per vision encoder layer of a tower of shape ``vision`` (:class:`leanvlm.flops.VisionShape`),
        the tokens per sequence its attention and MLP process, for a method that shortens the tower's
        sequence; None when the tower runs in full (the trace's ``tower_tokens`` must match it)."""
        return None

    def extra_tokens(self, num_layers: int, images: list[int]) -> list[int]:
        """Tokens each layer processes beyond the input's text and visual ones (inserted tokens)."""
        return [0] * num_layers

    @property
    def is_noop(self) -> bool:
        raise NotImplementedError

    def noop_on(self, num_layers: int) -> bool:
        """Whether this setting changes nothing on a model of ``num_layers`` decoder layers (``is_noop``,
        or a setting that is the no-op only at that depth, e.g. ProxyV starting at the last layer)."""
        return self.is_noop

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
