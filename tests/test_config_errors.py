"""Bad configurations raise leanvlm errors that name the argument, the value and what is allowed."""

import pytest
import torch
from models import PROMPTS, build, make_inputs

import leanvlm as lv


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: lv.FastV(keep_ratio=1.5), r"FastV: keep_ratio=1\.5 is outside \(0, 1\]"),
        (lambda: lv.FastV(keep_ratio=0), r"FastV: keep_ratio=0 is outside \(0, 1\]"),
        (lambda: lv.FastV(keep_ratio="half"), r"FastV: keep_ratio='half' must be a number"),
        (lambda: lv.FastV(layer=0), r"FastV: layer=0 is outside \[1, num_layers - 1\]"),
        (lambda: lv.FastV(layer=2.5), r"FastV: layer=2\.5 must be an int >= 1"),
        (lambda: lv.FastV(keep_tokens=-3), r"FastV: keep_tokens=-3 must be an int >= 0"),
        (lambda: lv.FastV(query="first"), r"FastV: query='first' is not one of 'last', 'text'"),
        (
            lambda: lv.FastV(positions="shifted"),
            r"positions='shifted' is not one of 'auto', 'original', 'compact'",
        ),
        (
            lambda: lv.PyramidDrop(layers=(8, 8, 24)),
            r"layers=\(8, 8, 24\) must be strictly increasing \(8 then 8\)",
        ),
        (lambda: lv.PyramidDrop(layers=(16, 8, 24)), r"must be strictly increasing \(16 then 8\)"),
        (
            lambda: lv.PyramidDrop(keep_ratios=(0.5, 0.75, 0.125)),
            r"keep_ratios=\(0\.5, 0\.75, 0\.125\) must be non-increasing \(0\.5 then 0\.75\)",
        ),
        (lambda: lv.PyramidDrop(keep_ratios=(0.5, 1.25, 0.1)), r"keep_ratios=1\.25 is outside \(0, 1\]"),
        (lambda: lv.PyramidDrop(layers=(8, 16), keep_ratios=(0.5,)), r"must have the same length"),
        (lambda: lv.PyramidDrop(layers=()), r"must name at least one layer"),
        (
            lambda: lv.PyramidDrop(layers=(0, 8), keep_ratios=(0.5, 0.25)),
            r"layers=\(0, 8\) has 0; each must be an int >= 1",
        ),
    ],
)
def test_bad_config_raises_at_construction(make, match):
    with pytest.raises(lv.ConfigError, match=match):
        make()


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        lv.FastV(keep_ratio=2)


@pytest.mark.parametrize(
    "method, match",
    [
        (lv.FastV(layer=99), r"FastV: layer=99 is outside \[1, 4\] for this model \(5 decoder layers\)"),
        (lv.FastV(layer=5), r"layer=5 is outside \[1, 4\]"),
        (
            lv.PyramidDrop(),
            r"PyramidDrop: layers\[0\]=8 is outside \[1, 4\] for this model \(5 decoder layers\)",
        ),
    ],
)
def test_layer_beyond_depth_raises_in_apply_and_leaves_model_untouched(method, match):
    model, _ = build("llava", num_layers=5)
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with pytest.raises(lv.ConfigError, match=match):
        lv.apply(model, method)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == n_hooks
    assert "generate" not in vars(model)
    assert lv.remove(model) is False
    with lv.apply(model, lv.FastV(layer=2)):  # and it can still be applied afterwards
        pass


def test_unsupported_model_names_supported_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        lv.UnsupportedModelError,
        match=r"LlamaForCausalLM is not supported; supported models: .*LlavaForConditionalGeneration",
    ):
        lv.apply(model, lv.FastV())


def test_applying_twice_or_two_llm_methods_is_refused():
    model, _ = build("llava", num_layers=5)
    with pytest.raises(
        lv.IncompatibleMethodsError, match="at most one in-LLM method at a time; got FastV, PyramidDrop"
    ):
        lv.apply(model, lv.FastV(), lv.PyramidDrop(layers=(1, 2), keep_ratios=(0.5, 0.25)))
    already = r"already has Applied\(LlavaForConditionalGeneration, FastV"
    with lv.apply(model, lv.FastV()), pytest.raises(lv.IncompatibleMethodsError, match=already):
        lv.apply(model, lv.FastV())


def test_non_method_argument_is_refused():
    model, _ = build("llava", num_layers=5)
    with pytest.raises(
        lv.ConfigError, match=r"apply\(\) takes method configs such as lv.FastV\(...\); got 'fastv'"
    ):
        lv.apply(model, "fastv")


def test_unsupported_attention_kernel_is_refused():
    model, _ = build("llava", num_layers=5)
    impl = model.model.language_model.config._attn_implementation
    model.model.language_model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(
            lv.UnsupportedModelError,
            match=r"attn_implementation='flex_attention' is not supported; supported: eager, sdpa",
        ):
            lv.apply(model, lv.FastV())
    finally:
        model.model.language_model.config._attn_implementation = impl


def test_last_report_needs_applied_model_and_a_prefill():
    model, proc = build("llava", num_layers=5)
    with pytest.raises(lv.ConfigError, match="has nothing applied"):
        lv.last_report(model)
    with lv.apply(model, lv.FastV(layer=2, keep_ratio=0.5)) as applied:
        with pytest.raises(lv.ConfigError, match="no prefill has run"):
            lv.last_report(model)
        with torch.no_grad():
            model(**make_inputs(proc, PROMPTS[:2]))
        report = lv.last_report(model, sample=1)
        assert [lf.visual for lf in report.layers] == applied.trace.visual_per_layer[1]
        assert report.equivalent_tokens == (2 * 16 + 3 * 8) / 5
        with pytest.raises(lv.ConfigError, match=r"sample=2 is outside \[0, 1\]"):
            lv.last_report(model, sample=2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: lv.FastV(keep_ratio=float("nan")), r"FastV: keep_ratio=nan must be a finite number"),
        (lambda: lv.FastV(keep_ratio=float("inf")), r"FastV: keep_ratio=inf must be a finite number"),
        (lambda: lv.FastV(keep_ratio=-float("inf")), r"FastV: keep_ratio=-inf must be a finite number"),
        (
            lambda: lv.PyramidDrop(keep_ratios=(0.5, float("nan"), 0.125)),
            r"PyramidDrop: keep_ratios=nan must be a finite number",
        ),
        (
            lambda: lv.PyramidDrop(keep_ratios=(float("inf"), 0.25, 0.125)),
            r"PyramidDrop: keep_ratios=inf must be a finite number",
        ),
        (lambda: lv.FastV(keep_ratio=True), r"FastV: keep_ratio=True must be a number"),
    ],
)
def test_nan_and_inf_are_refused(make, match):
    with pytest.raises(lv.ConfigError, match=match):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: lv.FastV(keep_tokens=True), r"FastV: keep_tokens=True must be an int >= 0 \(or None\)"),
        (lambda: lv.FastV(keep_tokens=False), r"FastV: keep_tokens=False must be an int >= 0 \(or None\)"),
        (lambda: lv.FastV(layer=True), r"FastV: layer=True must be an int >= 1"),
        (
            lambda: lv.VisualContextCompression(layer=True),
            r"VisualContextCompression: layer=True must be an int >= 1",
        ),
        (
            lambda: lv.VisualContextCompression(stride=True),
            r"VisualContextCompression: stride=True must be an int >= 1",
        ),
        (
            lambda: lv.PyramidDrop(layers=(1, True), keep_ratios=(0.5, 0.25)),
            r"PyramidDrop: layers=\(1, True\) has True; each must be an int >= 1",
        ),
    ],
)
def test_bools_are_not_ints(make, match):
    with pytest.raises(lv.ConfigError, match=match):
        make()


@pytest.mark.parametrize("stride", [2**63, 10**400])
def test_huge_stride_never_overflows_the_constructor(stride):
    for pool in ("1d", "2d"):
        try:
            method = lv.VisualContextCompression(stride=stride, pool=pool)
        except lv.ConfigError as err:
            assert "stride=" in str(err)
        else:
            assert method.stride == stride and not method.is_noop
    with pytest.raises(lv.ConfigError, match=r"stride=\d+\.\.\.\d+ must be a square number with pool='2d'"):
        lv.VisualContextCompression(stride=10**400 + 1, pool="2d")
    with pytest.raises(lv.ConfigError, match=r"stride=<int of 16610 bits> must be a square number"):
        lv.VisualContextCompression(stride=10**5000 + 1, pool="2d")  # too long for repr(): shown by its size
    assert lv.VisualContextCompression(stride=(2**40 + 1) ** 2, pool="2d").stride == (2**40 + 1) ** 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers": 8}, r"PyramidDrop: layers=8 must be a list, tuple or range of ints"),
        ({"layers": None}, r"PyramidDrop: layers=None must be a list, tuple or range of ints"),
        ({"layers": "123"}, r"PyramidDrop: layers='123' must be a list, tuple or range of ints"),
        (
            {"layers": {1: 0.5, 2: 0.25, 3: 0.1}},
            r"layers=\{1: 0\.5, 2: 0\.25, 3: 0\.1\} must be a list, tuple",
        ),
        ({"layers": {1, 2, 3}}, r"layers=\{1, 2, 3\} must be a list, tuple or range of ints"),
        ({"layers": (1.0, 2, 3)}, r"layers=\(1\.0, 2, 3\) has 1\.0; each must be an int >= 1"),
        ({"keep_ratios": 0.5}, r"PyramidDrop: keep_ratios=0\.5 must be a list or tuple of numbers"),
        ({"keep_ratios": None}, r"PyramidDrop: keep_ratios=None must be a list or tuple of numbers"),
        ({"keep_ratios": "0.5"}, r"PyramidDrop: keep_ratios='0\.5' must be a list or tuple of numbers"),
        ({"keep_ratios": ("0.5", 0.25, 0.1)}, r"PyramidDrop: keep_ratios='0\.5' must be a number"),
        ({"keep_ratios": range(3)}, r"keep_ratios=range\(0, 3\) must be a list or tuple of numbers"),
    ],
)
def test_pyramiddrop_sequences_must_be_sequences(kwargs, match):
    with pytest.raises(lv.ConfigError, match=match):
        lv.PyramidDrop(**kwargs)


def test_pyramiddrop_accepts_list_tuple_and_range():
    expected = lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125))
    assert lv.PyramidDrop(layers=[1, 2, 3], keep_ratios=[0.5, 0.25, 0.125]) == expected
    assert lv.PyramidDrop(layers=range(1, 4), keep_ratios=(0.5, 0.25, 0.125)) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            "pyramiddrop:layers=range(1,3)",
            r"PyramidDrop: layers='range\(1,3\)' must be a list, tuple or range",
        ),
        ("pyramiddrop:layers=8", r"PyramidDrop: layers=8 must be a list, tuple or range of ints"),
        ("fastv:keep_tokens=True", r"FastV: keep_tokens=True must be an int >= 0"),
        ("fastv:layer=2,layer=3", r"method argument 'layer' is given twice"),
        ("fastv:=3", r"method argument '=3' has no name before '='"),
        ("fastv:layer={[1]: 2}", r"FastV: layer='\{\[1\]: 2\}' must be an int >= 1"),
        ("fastv:layer=" + "[" * 3000, r"FastV: layer='\[\[\[.*\.\.\.\[+' must be an int >= 1"),
        (
            "warpdrive",
            r"unknown method 'warpdrive'; registered methods: " + ", ".join(sorted(lv.METHODS)),
        ),
    ],
)
def test_bad_specs_raise_config_error(spec, match):
    with pytest.raises(lv.ConfigError, match=match):
        lv.parse_method(spec)


def test_non_string_spec_is_refused():
    with pytest.raises(lv.ConfigError, match=r"method spec 3 must be a string"):
        lv.parse_method(3)


@pytest.mark.parametrize("cls", list(lv.METHODS.values()), ids=list(lv.METHODS))
def test_unknown_keyword_names_it_and_lists_the_allowed(cls):
    import dataclasses

    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    with pytest.raises(
        lv.ConfigError, match=rf"{cls.__name__}: unknown argument\(s\) warp, drive; allowed: {allowed}$"
    ):
        cls(warp=1, drive=2)
    n = len(dataclasses.fields(cls))
    with pytest.raises(lv.ConfigError, match=rf"{cls.__name__}: takes at most {n} positional argument\(s\)"):
        cls(*range(n + 1))
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(
        lv.ConfigError, match=rf"{cls.__name__}: argument\(s\) {first} given both by position"
    ):
        cls(2, **{first: 2})


def test_unknown_keyword_in_dataclasses_replace():
    import dataclasses

    with pytest.raises(lv.ConfigError, match=r"FastV: unknown argument\(s\) layers; allowed: keep_ratio"):
        dataclasses.replace(lv.FastV(), layers=3)
    assert dataclasses.replace(lv.FastV(), layer=3) == lv.FastV(layer=3)


def test_positional_arguments_still_work():
    assert lv.FastV(3, 0.25) == lv.FastV(layer=3, keep_ratio=0.25)
    assert lv.VisualContextCompression(2, 4, "2d") == lv.VisualContextCompression(
        layer=2, stride=4, pool="2d"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "llavolta:stride=4",
        "LLaVolta:stride=4",
        "VisualContextCompression:stride=4",
        "visual_context_compression:stride=4",
        "vcc:stride=4",
    ],
)
def test_method_found_by_class_name_and_alias(spec):
    assert lv.parse_method(spec) == lv.VisualContextCompression(stride=4)


def test_class_names_of_every_method_are_accepted():
    from leanvlm.registry import get_method

    for name, cls in lv.METHODS.items():
        assert get_method(name) is cls
        assert get_method(cls.__name__) is cls
        assert get_method(cls.__name__.upper()) is cls
        for alias in cls.aliases:
            assert get_method(alias) is cls
    with pytest.raises(
        lv.ConfigError,
        match=r"method name None must be a string; registered methods: cdpruner, crossget, divprune, fastv",
    ):
        get_method(None)


def test_alias_clash_is_refused_at_registration():
    from dataclasses import dataclass

    from leanvlm.registry import METHODS, register_method

    for name, aliases in [("warp", ("LLaVolta",)), ("fast_v", ()), ("warp", ("visual-context-compression",))]:
        with pytest.raises(lv.LeanVLMError, match="is already registered"):

            @register_method(name, aliases=aliases)
            @dataclass(frozen=True)
            class Warp(lv.Method):
                layer: int = 2

    assert "warp" not in METHODS and "fast_v" not in METHODS


VCC = lv.VisualContextCompression()


@pytest.mark.parametrize(
    "stages, match",
    [
        (((0.5,), (0.5, None)), r"StagedSchedule: stage 0=\(0\.5,\) must be a \(fraction, method\) pair"),
        (((0.5, None), (0.5, None, 1)), r"stage 1=\(0\.5, None, 1\) must be a \(fraction, method\) pair"),
        (((0.5, None), 0.5), r"StagedSchedule: stage 1=0\.5 must be a \(fraction, method\) pair"),
        ((("0.5", VCC), (0.5, None)), r"StagedSchedule: stage 0 fraction='0\.5' must be a number"),
        (((None, VCC),), r"StagedSchedule: stage 0 fraction=None must be a number"),
        (((True, VCC),), r"StagedSchedule: stage 0 fraction=True must be a number"),
        (((0.5, VCC), (float("nan"), None)), r"StagedSchedule: stage 1 fraction=nan must be a finite number"),
        (((float("inf"), VCC),), r"StagedSchedule: stage 0 fraction=inf must be a finite number"),
        (((1.5, VCC),), r"StagedSchedule: stage 0 fraction=1\.5 is outside \(0, 1\]"),
        (((0, VCC), (1, None)), r"StagedSchedule: stage 0 fraction=0 is outside \(0, 1\]"),
        (((1.0, "vcc"),), r"StagedSchedule: stage 0 method='vcc' is not a method config \(or None\)"),
        (None, r"StagedSchedule: stages=None must be a list or tuple of \(fraction, method\) stages"),
        ("1:vcc", r"StagedSchedule: stages='1:vcc' must be a list or tuple"),
        ((), r"StagedSchedule: stages=\(\) must hold at least one"),
    ],
)
def test_malformed_schedule_stages(stages, match):
    with pytest.raises(lv.ConfigError, match=match):
        lv.StagedSchedule(stages)


def test_schedule_accepts_lists_and_ints():
    schedule = lv.StagedSchedule([[1, VCC]])
    assert schedule.stages == ((1.0, VCC),) and isinstance(schedule.stages[0][0], float)
