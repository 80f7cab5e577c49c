"""apply / remove: install methods on a stock transformers VLM and take them away again."""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import weakref

from . import compat
from .engine import Engine, Trace
from .errors import ConfigError, IncompatibleMethodsError, LeanVLMError, UnsupportedModelError
from .methods.base import INSTALLABLE_STAGES, NEEDS, STAGES, Method
from .modules import modules_for
from .registry import find_adapter

SUPPORTED_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")

_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: every module an applied engine hooks -> that model's handle (two models sharing a submodule can not
#: both be applied: their hooks would drive one module)
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Applied:
    """Handle returned by :func:`apply`. Use it as a context manager or call :meth:`remove`."""

    def __init__(self, model, methods: tuple[Method, ...], adapter, engine: Engine):
        self.model = model
        self.methods = methods
        self.adapter = adapter
        self.engine = engine

    @property
    def trace(self) -> Trace:
        """What the model processed: per layer in the last prefill (``tokens_per_layer``,
        ``visual_per_layer``) and per decode step since then (``decode``); see :class:`Trace`."""
        own = self.engine.trace
        if own.prefills == 0 and self.engine.last_trace is not None:
            return self.engine.last_trace  # e.g. generate() ran in a worker thread (a streamer)
        return own

    @contextlib.contextmanager
    def prompt_length(self, n: int):
        """Within this block, forward passes rank visual tokens with the query of a prompt of ``n``
        tokens (e.g. the last prompt token) even when the input continues past it, as when scoring
        candidate answers appended to a prompt. ``n`` counts positions of the (left-padded) input, so
        it must reach past every sample's padding. ``generate()`` does this by itself. The setting holds
        for forward passes run in the thread that entered the block."""
        try:
            value = None if isinstance(n, bool) else operator.index(n)
        except TypeError:
            value = None
        if value is None or value < 1:
            raise ConfigError(f"prompt_length: n={n!r} must be an int >= 1 (positions of the padded prompt)")
        n = value
        previous = self.engine.prompt_len
        self.engine.prompt_len = n
        try:
            yield self
        finally:
            self.engine.prompt_len = previous

    @property
    def active(self) -> bool:
        return _APPLIED.get(self.model) is self

    def remove(self) -> None:
        """Take every hook away; the model is exactly as before :func:`apply`. Idempotent."""
        if self.active:
            for module in self.engine.hooked_modules():
                if _HOOKED.get(module) is self:
                    del _HOOKED[module]
            self.engine.remove()
            del _APPLIED[self.model]

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(m.describe() for m in self.methods) or "no method"
        return f"Applied({type(self.model).__name__}, {names}, active={self.active})"


def apply(model, *methods: Method) -> Applied:
    """Install ``methods`` on ``model`` (a stock transformers VLM); returns a handle.

    Every check runs before anything is installed, so a failing call leaves the model untouched.
    With no method, only the trace is recorded (useful as a baseline).
    """
    if model in _APPLIED:
        raise IncompatibleMethodsError(
            f"{type(model).__name__} already has {_APPLIED[model]!r}; call lv.remove(model) first"
        )
    for m in methods:
        if not isinstance(m, Method):
            raise ConfigError(f"apply() takes method configs such as lv.FastV(...); got {m!r}")
    compat.warn_if_untested()
    adapter = find_adapter(model)
    ordered = compose(methods)
    for m in ordered:
        m.check_model(adapter.num_layers)
        m.check_adapter(adapter)
        if m.trainable and m.requires_modules and not m.noop_on(adapter.num_layers):
            modules_for(model, m)  # raises, naming lv.prepare, when the method's modules are not attached
    impl = adapter.attn_implementation
    if ordered and impl not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attn_implementation={impl!r} is not supported; supported: {', '.join(SUPPORTED_ATTENTION)}"
        )
    engine = Engine(adapter, ordered)
    engine.install()
    return _register(Applied(model, tuple(methods), adapter, engine))


def compose(methods) -> tuple[Method, ...]:
    """The methods in stage order (vision tower, LLM input, inside the LLM, decoding), after checking
    that the engine can install each one's stage and needs, and that no two share a stage unless both
    say they compose. Raises ConfigError / IncompatibleMethodsError naming the methods."""
    for m in methods:
        name = type(m).__name__
        if m.stage not in INSTALLABLE_STAGES:
            raise UnsupportedModelError(
                f"{name} acts at stage {m.stage!r}, which this version of leanvlm cannot install; "
                f"installable stages: {', '.join(INSTALLABLE_STAGES)}"
            )
        unknown = [need for need in m.needs if need not in NEEDS]
        if unknown:
            raise UnsupportedModelError(
                f"{name} needs {', '.join(map(repr, unknown))}, which the engine does not provide; "
                f"it provides: {', '.join(NEEDS)}"
            )
    ordered = sorted(methods, key=lambda m: STAGES.index(m.stage))
    for a, b in itertools.pairwise(ordered):
        if a.stage == b.stage and not (a.composes and b.composes):
            label = "in-LLM" if a.stage == "llm" else f"{a.stage}-stage"
            raise IncompatibleMethodsError(
                f"at most one {label} method at a time; got {type(a).__name__}, {type(b).__name__} "
                "(methods that share a stage must both declare composes=True)"
            )
    before = [m for m in ordered if m.stage in ("vision", "input") and m.changes_length]
    for a, b in itertools.pairwise(before):
        if not (a.composes and b.composes):
            raise IncompatibleMethodsError(
                f"at most one method that reduces visual tokens before the LLM at a time; got "
                f"{type(a).__name__}, {type(b).__name__} (compose one of them with an in-LLM method instead)"
            )
    return tuple(ordered)


def _register(handle: Applied) -> Applied:
    modules = handle.engine.hooked_modules()
    for module in modules:
        other = _HOOKED.get(module)
        if other is not None and other.active and other.model is not handle.model:
            handle.engine.remove()
            raise IncompatibleMethodsError(
                f"{type(handle.model).__name__} shares its {type(module).__name__} with another model that "
                f"has {other!r}; remove that one first (lv.remove(other_model))"
            )
    for module in modules:
        _HOOKED[module] = handle
    _APPLIED[handle.model] = handle
    handle.engine.on_copy = functools.partial(_adopt_copy, handle.methods)
    return handle


def _adopt_copy(methods, engine: Engine) -> None:
    """``copy.deepcopy`` of an applied model: the copy is applied too, with its own handle."""
    _register(Applied(engine.adapter.model, methods, engine.adapter, engine))


def handle_of(model) -> Applied | None:
    """What :func:`apply` installed on ``model`` (None if nothing is applied)."""
    return _APPLIED.get(model)


def remove(model) -> bool:
    """Remove whatever :func:`apply` installed on ``model``. Returns False if nothing was applied."""
    handle = _APPLIED.get(model)
    if handle is None:
        return False
    handle.remove()
    return True


def last_report(model, sample: int = 0):
    """FLOPs, per-layer token counts and KV-cache bytes of ``sample`` in the last prefill of a model
    that has methods applied (a :class:`leanvlm.flops.FlopsReport`; ``print(report.table())``)."""
    from . import flops

    handle = _APPLIED.get(model)
    if handle is None:
        raise ConfigError(f"{type(model).__name__} has nothing applied; call lv.apply(model, ...) first")
    trace = handle.trace
    if not trace.stages:
        raise ConfigError("no prefill has run since lv.apply(); run the model first")
    if not 0 <= sample < trace.batch_size:
        raise ConfigError(f"sample={sample} is outside [0, {trace.batch_size - 1}] for the last batch")
    shape = type(handle.adapter).model_shape(model.config)
    dtype_bytes = next(model.parameters()).element_size()
    sequences = None
    if trace.vision_inputs and not shape.visual_tokens_per_image:
        try:
            sequences = handle.adapter.vision_sequences(trace.vision_inputs, sample)
        except (LeanVLMError, KeyError):
            sequences = None  # from_trace notes that the vision tower is not counted
    return flops.from_trace(shape, trace, sample, dtype_bytes=dtype_bytes, vision_sequences=sequences)
