"""Checks that need a CUDA device (skipped without one): bf16 and the GPU attention kernels."""

import pytest
import torch
from models import PROMPTS, make_inputs

import leanvlm as lv
from leanvlm.presets import tiny_llava

pytestmark = pytest.mark.gpu


def gpu_model(attn: str, dtype=torch.bfloat16):
    model, proc = tiny_llava(num_layers=5, attn_implementation=attn, dtype=dtype, device="cuda")
    return model, proc


@pytest.mark.parametrize(
    "method",
    [lv.FastV(layer=2, keep_ratio=0.5), lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125))],
    ids=["fastv", "pdrop"],
)
def test_bf16_sdpa_matches_eager_and_cache(method):
    outs = {}
    for attn in ("eager", "sdpa"):
        model, proc = gpu_model(attn)
        inputs = make_inputs(proc, PROMPTS).to("cuda")
        with lv.apply(model, method) as applied:
            cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
            outs[attn] = [k for stage in applied.trace.kept_visual for k in stage]
        assert torch.equal(cached, uncached)
    for a, b in zip(outs["eager"], outs["sdpa"], strict=True):
        assert torch.equal(a, b)


def test_flash_attention_2_matches_sdpa():
    pytest.importorskip("flash_attn")
    method = lv.FastV(layer=2, keep_ratio=0.5)
    logits = {}
    for attn in ("sdpa", "flash_attention_2"):
        model, proc = gpu_model(attn)
        inputs = make_inputs(proc, PROMPTS[:2]).to("cuda")
        with lv.apply(model, method), torch.no_grad():
            logits[attn] = model(**inputs).logits[:, -1].float()
    torch.testing.assert_close(logits["sdpa"], logits["flash_attention_2"], atol=5e-2, rtol=5e-2)
