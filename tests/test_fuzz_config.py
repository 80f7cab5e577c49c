"""Property tests of the configuration contract, over every registered method (new ones included).

Any keyword arguments, and any ``name:key=value,...`` spec, either
  - build a method config that ``lv.apply`` accepts and that then runs a plain forward pass, or that
    ``lv.apply`` refuses with a leanvlm error naming one of the method's arguments (a layer beyond the
    model's depth), or
  - raise a leanvlm error (never a bare TypeError, ValueError, OverflowError, ...) that names the
    argument (or, for a spec, the piece of text) at fault.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm.methods.spec import split_top_level
from leanvlm.registry import METHODS

NUM_LAYERS = 5
METHOD_CLASSES = [METHODS[name] for name in sorted(METHODS)]
#: every choice string the methods know, so that drawn strings are often valid
CHOICES = ("last", "text", "auto", "original", "compact", "1d", "2d", "mean", "first")
#: names that are not constructor arguments (some are class attributes of every method)
UNKNOWN = ("name", "stage", "aliases", "needs_scores", "Layer", "layers_", "strides", "_x", "keep")

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def tiny():
    """The 5-layer tiny LLaVA and a two-prompt batch (one thread: forwards on this model are ~15 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, proc = build("llava", num_layers=NUM_LAYERS)
    yield model, make_inputs(proc, PROMPTS[:2])
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- strategies

HUGE = st.sampled_from([2**31, 2**63, -(2**63), 10**400, -(10**400)])
INTS = st.one_of(st.integers(-3, 8), st.integers(), HUGE)
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 5e-324, 1e308])
FLOATS = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True), SPECIAL_FLOATS)
STRINGS = st.one_of(st.text(max_size=6), st.sampled_from(CHOICES), st.sampled_from(["0.5", "2", "nan", ""]))
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), st.none(), STRINGS)
RANGES = st.builds(range, st.integers(-2, 6), st.integers(-2, 8))
WIDE = st.recursive(
    st.one_of(SCALARS, RANGES),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 8)), inner, max_size=3),
        st.frozensets(st.integers(0, 8), max_size=3),
    ),
    max_leaves=8,
)


def field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def accepted_choices(cls, field: str) -> tuple[str, ...]:
    """The strings of CHOICES that ``cls`` accepts for ``field`` (found by trying each)."""
    out = []
    for choice in CHOICES:
        try:
            cls(**{field: choice})
        except lv.LeanVLMError:
            continue
        out.append(choice)
    return tuple(out)


#: {class: {str field: the choices it accepts}}, so that drawn strings are often valid
VALID_CHOICES = {
    cls: {
        f.name: accepted_choices(cls, f.name)
        for f in dataclasses.fields(cls)
        if f.init and isinstance(f.default, str)
    }
    for cls in METHOD_CLASSES
}


def plausible(cls, field: dataclasses.Field, n: int):
    """Values of the default's kind, often valid (so that many draws reach the forward pass); ``n`` is
    the length shared by every sequence field of one draw (PyramidDrop's layers and keep_ratios)."""
    default = field_default(field)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(1, NUM_LAYERS + 1)
    if isinstance(default, float):
        return st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([1.0, 0.5, 1e-9, 0.0]))
    if isinstance(default, str):
        return st.sampled_from((default, *VALID_CHOICES[cls][field.name], *CHOICES[:2]))
    if default is None:  # an optional count (FastV.keep_tokens)
        return st.one_of(st.none(), st.integers(0, 40))
    if isinstance(default, (tuple, list)):
        if default and isinstance(default[0], float):
            ratios = st.floats(0, 1, exclude_min=True)
            return st.lists(ratios, min_size=n, max_size=n).map(lambda v: tuple(sorted(v, reverse=True)))
        layers = st.lists(st.integers(1, NUM_LAYERS), min_size=n, max_size=n, unique=True)
        return st.one_of(layers.map(sorted).map(tuple), layers.map(sorted), st.just(range(1, n + 1)))
    return WIDE


@st.composite
def method_kwargs(draw, cls):
    """Keyword arguments for ``cls``: each field left out, given a plausible value or (in half the draws)
    a wild one; now and then an unknown name."""
    n = draw(st.integers(1, 4))
    tame = draw(st.booleans())  # half the draws have no wild value, so that many reach the forward pass
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = field_default(field)
        how = draw(st.sampled_from(["default", "plausible", "plausible", *([] if tame else ["wild"])]))
        if how == "default" and default is not dataclasses.MISSING:
            continue
        kwargs[field.name] = draw(WIDE if how == "wild" else plausible(cls, field, n))
    if draw(st.integers(0, 99)) >= 88:  # about one draw in 8 (hypothesis favours 0)
        kwargs[draw(st.sampled_from(UNKNOWN))] = draw(WIDE)
    return kwargs


def value_text(values):
    """The text of a value in a spec: the literal of a plausible value (mostly), of a wild one, or
    arbitrary characters."""
    noise = st.text(alphabet="0123456789.-+e[](){},;:=' \"abxyz_", max_size=10)
    how = st.sampled_from(["plausible", "plausible", "plausible", "wild", "noise"])
    return how.flatmap(lambda h: {"plausible": values.map(repr), "wild": WIDE.map(repr), "noise": noise}[h])


@st.composite
def specs(draw):
    """(spec, method name as written, keys written) for a random method, written by any of its names."""
    cls = draw(st.sampled_from(METHOD_CLASSES))
    known = st.sampled_from([cls.name, cls.__name__, *getattr(cls, "aliases", ())]).flatmap(
        lambda s: st.sampled_from([s, s.upper(), s.lower(), s.swapcase(), f" {s} "])
    )
    other = st.one_of(
        st.sampled_from(["none", "warpdrive", "fast-v", "VISUAL_CONTEXT_COMPRESSION", ""]),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_- ", max_size=8),
    )
    name = draw(known if draw(st.integers(0, 99)) < 80 else other)
    n = draw(st.integers(1, 4))
    tame = draw(st.booleans())
    keys, items = [], []
    for field in dataclasses.fields(cls):
        if field.init and draw(st.booleans()):
            keys.append(field.name)
            values = plausible(cls, field, n)
            items.append(f"{field.name}={draw(values.map(repr) if tame else value_text(values))}")
    if draw(st.integers(0, 99)) >= 88:  # about one draw in 8 (hypothesis favours 0)
        key = draw(st.sampled_from(UNKNOWN))
        keys.append(key)
        items.append(f"{key}={draw(value_text(INTS))}")
    order = draw(st.permutations(range(len(items))))
    args = ",".join(items[i] for i in order)
    return (f"{name}:{args}" if args or draw(st.booleans()) else name), name, keys


# ---------------------------------------------------------------- the contract


def names_any(message: str, names) -> bool:
    """``message`` names one of ``names`` as a word (``layer`` is not found inside ``layers``)."""
    return any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", message) for n in names if n)


def run_applied(tiny, method) -> str:
    """``method`` (accepted by its constructor) is applied and runs one forward pass, or ``apply`` (or the
    forward, for a budget the input can not meet) refuses it with a leanvlm error naming one of its
    arguments."""
    model, inputs = tiny
    fields = [f.name for f in dataclasses.fields(method)]
    if method.trainable:  # its fresh modules (the model is shared: they are taken off again below)
        lv.prepare(model, method)
    try:
        lv.apply(model, method)
    except lv.LeanVLMError as err:
        assert names_any(str(err), fields), f"apply's error names no argument of {method.describe()}: {err}"
        model._modules.pop(lv.modules.ATTR, None)
        return "refused by apply"
    try:
        with torch.no_grad():
            try:
                out = model(**inputs)
            except lv.ConfigError as err:  # a budget the input can not meet (more tokens than an image has)
                assert names_any(str(err), fields), (
                    f"the forward's error names no argument of {method.describe()}: {err}"
                )
                return "refused by the input"
        assert out.logits.shape[0] == inputs["input_ids"].shape[0]
        assert torch.isfinite(out.logits).all(), f"non-finite logits with {method.describe()}"
        return "ran"
    finally:
        lv.remove(model)
        model._modules.pop(lv.modules.ATTR, None)


@pytest.mark.parametrize("cls", METHOD_CLASSES, ids=[c.name for c in METHOD_CLASSES])
def test_any_keyword_arguments_are_accepted_or_named(tiny, cls):
    @FUZZ
    @given(kwargs=method_kwargs(cls))
    def check(kwargs):
        try:
            method = cls(**kwargs)
        except lv.LeanVLMError as err:
            message = str(err)
            assert message.startswith(f"{cls.__name__}: "), message
            assert names_any(message, kwargs), (
                f"{cls.__name__}(**{kwargs!r}): the error names no argument: {err}"
            )
            event("refused by the constructor")
            return
        event(run_applied(tiny, method))

    check()


@FUZZ
@given(drawn=specs())
def test_any_spec_is_accepted_or_named(tiny, drawn):
    spec, name, keys = drawn
    try:
        method = lv.parse_method(spec)
    except lv.LeanVLMError as err:
        message = str(err)
        pieces = split_top_level(spec.partition(":")[2])
        named = (
            names_any(message, keys)
            or repr(name.strip()) in message  # unknown method
            or any(repr(p) in message for p in pieces)  # a piece that is not key=value
        )
        assert named, f"parse_method({spec!r}): the error names neither the method nor an argument: {err}"
        event("refused by parse_method")
        return
    event("none" if method is None else run_applied(tiny, method))


@pytest.mark.parametrize(
    "spec",
    ["vcc:stride=9223372036854775808", "vcc:stride=" + "1" + "0" * 400 + ",pool='2d'", "fastv:keep_tokens=0"],
)
def test_extreme_accepted_values_run(tiny, spec):
    """Extremes the constructors accept must also run (the engine clamps a stride larger than an image
    to the image's length; keeping no visual token at all is allowed)."""
    assert run_applied(tiny, lv.parse_method(spec)) == "ran"
