"""FLOPs accounting: hand-computed values, the published PyramidDrop figures, and trace == schedule."""

import pytest
from models import PROMPTS, build, make_inputs

import leanvlm as lv
from leanvlm import compat, flops
from leanvlm.adapters import LlavaAdapter
from leanvlm.presets import preset_config

SHAPE_7B = LlavaAdapter.model_shape(preset_config("llava-1.5-7b"))


def test_llava15_7b_shape_from_config():
    t, v = SHAPE_7B.text, SHAPE_7B.vision
    assert (t.num_layers, t.hidden, t.intermediate, t.heads, t.kv_heads, t.head_dim) == (
        32,
        4096,
        11008,
        32,
        32,
        128,
    )
    assert (v.layers, v.hidden, v.tokens) == (24, 1024, 577)
    assert SHAPE_7B.visual_tokens_per_image == 576


def test_paper_convention_reproduces_published_pyramiddrop_figures():
    """PyramidDrop (arXiv 2410.17247, appendix): LLaVA-1.5-7B 3.82 TFLOPs vanilla, 1.78 with S=4, lambda=0.5."""
    base_tokens, base_visual = flops.schedule_counts(None, 32, 576, 64)
    pd_tokens, pd_visual = flops.schedule_counts(lv.PyramidDrop(), 32, 576, 64)
    base = flops.report(SHAPE_7B, base_tokens, base_visual, images=1)
    pdrop = flops.report(SHAPE_7B, pd_tokens, pd_visual, images=1)
    assert round(base.paper_total / 1e12, 2) == 3.82
    assert round(pdrop.paper_total / 1e12, 2) == 1.78
    assert pdrop.equivalent_tokens == 270.0  # (576 + 288 + 144 + 72) / 4


def test_fastv_k2_half_is_55_to_59_percent_of_the_unpruned_llm():
    """FastV's own count (all prompt tokens, LLM layers) puts K=2, R=50% at 55-59% of the unpruned cost."""
    n_text = 64
    base = flops.report(SHAPE_7B, *flops.schedule_counts(None, 32, 576, n_text), images=1)
    fastv = flops.report(
        SHAPE_7B, *flops.schedule_counts(lv.FastV(layer=2, keep_ratio=0.5), 32, 576, n_text), images=1
    )
    assert 0.55 <= fastv.llm / base.llm <= 0.59
    # the whole prompt with the vision tower (unchanged by FastV) is a little higher
    assert fastv.prefill_total / base.prefill_total > fastv.llm / base.llm
    assert fastv.equivalent_tokens == (2 * 576 + 30 * 288) / 32
    # the visual-only paper convention counts no text, so FastV looks cheaper there
    assert fastv.paper_total / base.paper_total == pytest.approx(0.526, abs=0.001)


def test_layer_formulas_by_hand():
    t = flops.TextShape(num_layers=1, hidden=8, intermediate=20, heads=4, kv_heads=2, head_dim=2, vocab=50)
    n = 5
    # q: 8->8, k,v: 8->4 each, o: 8->8, 2 FLOPs per multiply-add
    assert flops.attention_projection_flops(t, n) == 2 * n * (8 * 8 + 2 * 8 * 4 + 8 * 8)
    assert flops.attention_score_flops(t, n, 7, causal=False) == 2 * 2 * n * 7 * 4 * 2
    assert flops.attention_score_flops(t, n, n) == 2 * 2 * (n * (n + 1) // 2) * 4 * 2  # causal prefill
    assert flops.attention_score_flops(t, 1, 7) == 2 * 2 * 7 * 4 * 2  # one new token sees every key
    assert flops.ffn_flops(t, n) == 2 * 3 * n * 8 * 20
    assert flops.paper_layer_flops(t, 3) == 4 * 3 * 64 + 2 * 9 * 8 + 3 * 3 * 8 * 20
    assert flops.lm_head_flops(t) == 2 * 8 * 50
    assert flops.kv_cache_bytes(t, [5, 3], 2) == 2 * (5 + 3) * 2 * 2 * 2
    v = flops.VisionShape(layers=2, hidden=4, intermediate=16, tokens=5, patch_size=2, channels=3)
    per_layer = 2 * 5 * 4 * 16 + 2 * 2 * 25 * 4 + 2 * 2 * 5 * 4 * 16
    assert flops.vision_flops(v) == 2 * 4 * 3 * 4 * 4 + 2 * per_layer
    report = flops.report(flops.ModelShape("x", t, v, ((4, 8), (8, 8)), 4), [n], [3], images=2)
    assert report.projector == 2 * 3 * (4 * 8 + 8 * 8)
    assert report.prefill_total == 2 * flops.vision_flops(v) + report.projector + report.llm + report.lm_head
    assert report.decode_flops_per_token == (
        flops.attention_projection_flops(t, 1)
        + flops.attention_score_flops(t, 1, n + 1)
        + flops.ffn_flops(t, 1)
        + 100 * 8
    )


@pytest.mark.parametrize(
    "method",
    [
        lv.FastV(layer=2, keep_ratio=0.25),
        lv.PyramidDrop(layers=(1, 2, 3), keep_ratios=(0.5, 0.25, 0.125)),
        None,
    ],
    ids=["fastv", "pdrop", "none"],
)
def test_trace_counts_equal_what_the_formula_assumes(method):
    model, proc = build("llava", num_layers=5)
    inputs = make_inputs(proc, PROMPTS[:1])
    with lv.apply(model, *([method] if method else [])) as applied:
        out = model(**inputs, use_cache=True)
        measured = flops.from_trace(LlavaAdapter.model_shape(model.config), applied.trace, dtype_bytes=4)
    n_text = inputs["input_ids"].shape[1] - 16
    tokens, visual = flops.schedule_counts(method, 5, 16, n_text)
    assert [lf.tokens for lf in measured.layers] == tokens
    assert [lf.visual for lf in measured.layers] == visual
    assert measured.images == 1
    real_kv = sum(k.numel() + v.numel() for k, v in compat.layer_tensors(compat.output_cache(out))) * 4
    assert measured.kv_bytes == real_kv
    # the ranking work the trace recorded is what the schedule implies (one query row per ranking step)
    assert [n for n, _ in applied.trace.scoring_counts(0)] == [
        n for n, _ in flops.schedule_scoring(method, tokens, n_text)
    ]
    assert measured.scoring == sum(
        flops.scoring_flops(measured.shape.text, n, q)
        for n, q in flops.schedule_scoring(method, tokens, n_text)
    )
    assert (measured.scoring > 0) == (method is not None)


def test_table_lists_every_layer_and_both_conventions():
    report = flops.report(SHAPE_7B, *flops.schedule_counts(lv.PyramidDrop(), 32, 576, 64), images=1)
    text = report.table()
    assert len([line for line in text.splitlines() if line[:5].strip().isdigit()]) == 32
    assert "real FLOPs (2 per multiply-add, whole prompt)" in text
    assert "paper FLOPs (PyramidDrop convention" in text and "1.78T" in text
    summary = report.summary()
    assert summary["prefill_flops"] == report.prefill_total and summary["equivalent_tokens"] == 270.0
