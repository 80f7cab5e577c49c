"""Real-shape presets, built on the meta device (no memory): parameter counts match the published models."""

import pytest
import torch

import leanvlm as lv
from leanvlm.presets import build_preset
from leanvlm.registry import find_adapter


@pytest.mark.parametrize(
    "preset, billions, model_class",
    [
        ("llava-1.5-7b", 7.063, "LlavaForConditionalGeneration"),
        ("llava-1.5-13b", 13.351, "LlavaForConditionalGeneration"),
        ("llava-next-7b", 7.063, "LlavaNextForConditionalGeneration"),
        ("qwen2.5-vl-7b", 8.292, "Qwen2_5_VLForConditionalGeneration"),
    ],
)
def test_real_shape_presets(preset, billions, model_class):
    default = torch.get_default_dtype()
    model, _ = build_preset(preset, device="meta", dtype=torch.bfloat16)
    assert torch.get_default_dtype() == default  # the build leaves the process default alone
    assert type(model).__name__ == model_class
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.001)
    adapter = find_adapter(model)
    lv.PyramidDrop().check_model(adapter.num_layers)  # the default schedule fits every real shape
