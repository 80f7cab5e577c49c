"""What a method hands the engine: a plan of steps, each at one place of the model.

* :class:`Step`: at the input of decoder layer ``layer`` (0: the LLM's input, i.e. the embeddings with
  the image features merged in, before any layer), call ``edit(ctx)``, which returns a generic edit
  (:mod:`leanvlm.engine.edits`), None, or a list of them applied in order (a callable in the list is
  called with the context after the edits before it, and returns an edit). A step may first observe an earlier layer: ``observe(ctx)``
  runs at the input of ``observe_layer``, after that layer's own edits (what the layer computes on; e.g.
  FastV scores at layer K-1 and drops at K, SparseVLM's stages at consecutive layers), and its result
  reaches ``edit`` as ``ctx.observed``.
* :class:`Vision`: at a vision-tower encoder layer's input, observe (or replace) its hidden states.
* :class:`VisionRun`: vision-tower encoder layers ``start .. end-1`` are computed by ``run(vctx, layer_idx,
  layer, hidden, call_layer)``, which may return a sequence of another length (merging inside the tower).
* :class:`Replace`: decoder layers ``start .. end-1`` are computed by ``run(ctx, layer_idx, layer, hidden,
  call_layer)`` instead of by their own forward, in prefills where the runner is active; ``call_layer
  (hidden, **changes)`` runs the stock layer (with changed keyword arguments) and returns its hidden
  states. The runner returns the layer's output hidden states.

The engine validates a plan when the method is applied (layers in range, no two Replace over one
layer); a step at layer 0 makes the method act before the LLM, which shortens every layer's cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError, IncompatibleMethodsError


@dataclass(frozen=True)
class Step:
    layer: int
    edit: Callable
    observe: Callable | None = None
    observe_layer: int | None = None


@dataclass(frozen=True)
class Vision:
    """At the input of the vision tower's encoder layer ``layer``, call ``run(vctx)``
    (:class:`leanvlm.engine.context.VisionContext`): it may return new hidden states of the same shape
    (or None), and what it stores in ``vctx.store`` reaches the method's later steps as ``ctx.vision``.
    The image features themselves are what the input stage (``Step(0, ...)``) sees at the visual slots."""

    layer: int
    run: Callable


@dataclass(frozen=True)
class VisionRun:
    """Vision encoder layers ``start .. end-1`` are computed by ``run(vctx, layer_idx, layer, hidden,
    call_layer)`` (:class:`leanvlm.engine.context.VisionContext`; ``call_layer(hidden, **changes)`` runs
    the stock layer) whenever the tower runs while the method is applied. The runner may return hidden
    states of another length: the next layer gets them, and the tower's outputs are what the layers
    returned (the model reads its image features from them, so they must have the stock shape there)."""

    start: int
    end: int
    run: Callable


@dataclass(frozen=True)
class Replace:
    start: int
    end: int
    run: Callable


def check_plan(method, plan: list, num_layers: int, num_vision_layers=None) -> None:
    """Refuse a plan the engine cannot install, or one that does not match what ``method`` declares
    (its stage, ``changes_length``), naming the step (``num_vision_layers``: a callable, asked only when
    the plan has vision steps)."""
    owner, stage = type(method).__name__, method.stage
    for item in plan:
        if isinstance(item, Vision):
            n = num_vision_layers()
            if not 0 <= item.layer < n:
                raise ConfigError(f"{owner}: a vision step at layer {item.layer} is outside [0, {n - 1}]")
            _check_stage(owner, stage, ("vision",), f"a vision step at layer {item.layer}")
        elif isinstance(item, Step):
            if not 0 <= item.layer < num_layers:
                raise ConfigError(f"{owner}: a step at layer {item.layer} is outside [0, {num_layers - 1}]")
            if item.observe is not None:
                if item.observe_layer is None or not 0 <= item.observe_layer <= item.layer:
                    raise ConfigError(
                        f"{owner}: a step at layer {item.layer} observes layer {item.observe_layer}; it must be "
                        f"in [0, {item.layer}]"
                    )
                if item.layer == 0:
                    raise ConfigError(f"{owner}: an input-stage step can not observe a decoder layer")
            allowed = ("vision", "input") if item.layer == 0 else ("llm",)
            _check_stage(owner, stage, allowed, f"a step at layer {item.layer}")
            if not method.changes_length:
                raise ConfigError(f"{owner} declares changes_length=False but its plan edits the token set")
        elif isinstance(item, VisionRun):
            n = num_vision_layers()
            if not 0 <= item.start < item.end <= n:
                raise ConfigError(
                    f"{owner}: VisionRun({item.start}, {item.end}) must satisfy 0 <= start < end <= {n}"
                )
            _check_stage(owner, stage, ("vision",), f"VisionRun({item.start}, {item.end})")
        elif isinstance(item, Replace):
            if not 1 <= item.start < item.end <= num_layers:
                raise ConfigError(
                    f"{owner}: Replace({item.start}, {item.end}) must satisfy 1 <= start < end <= {num_layers}"
                )
            # a method acting in the tower may also compute decoder layers (CrossGET's text cross token)
            _check_stage(owner, stage, ("llm", "vision"), f"Replace({item.start}, {item.end})")
        else:
            raise ConfigError(
                f"{owner}: plan() returned {type(item).__name__}; expected Step, Vision, VisionRun or Replace items"
            )


def _check_stage(owner: str, stage: str, allowed: tuple[str, ...], what: str) -> None:
    """A plan item must sit in the stage its method declares (composition is checked by stage)."""
    if stage not in allowed:
        raise ConfigError(
            f"{owner} declares stage={stage!r} but its plan has {what} (stage {' or '.join(allowed)})"
        )


def check_runners(plans: list[tuple[str, list]]) -> None:
    """Two methods can not both replace one layer. ``plans``: (method description, plan) pairs."""
    owner_of: dict[tuple[str, int], str] = {}
    for owner, plan in plans:
        for item in plan:
            if isinstance(item, (Replace, VisionRun)):
                kind = "vision encoder" if isinstance(item, VisionRun) else "decoder"
                for i in range(item.start, item.end):
                    if (kind, i) in owner_of:
                        raise IncompatibleMethodsError(
                            f"{owner_of[kind, i]} and {owner} both replace {kind} layer {i}"
                        )
                    owner_of[kind, i] = owner
