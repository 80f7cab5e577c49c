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
