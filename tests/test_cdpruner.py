"""CDPruner: the fast greedy MAP inference against a slow greedy that recomputes log-determinants from
scratch, its properties and guards, and the tokens the method keeps on a model against the selection run
by hand on the model's own input embeddings."""

from __future__ import annotations

import pytest
import torch
from models import build, llm_input, make_inputs

import leanvlm as lv
from leanvlm.ops.dpp import conditional_kernel, dpp_greedy, relevance


def slow_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """Each step: the unselected item whose addition gives the largest log det, from scratch (float64)."""
    selected: list[int] = []
    for _ in range(k):
        best, best_value = None, -float("inf")
        for n in range(kernel.shape[0]):
            if n in selected:
                continue
            idx = torch.tensor([*selected, n])
            sign, value = torch.linalg.slogdet(kernel[idx][:, idx])
            value = float(value) if sign > 0 else -float("inf")
            if value > best_value:
                best, best_value = n, value
        selected.append(best)
    return sorted(selected)


def random_kernel(seed: int, n=60, d=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    r = torch.rand(n, generator=g, dtype=torch.float64) * 0.95 + 0.05
    return x, r, conditional_kernel(x, r)


@pytest.mark.parametrize("seed", range(10))
def test_fast_greedy_equals_slow_greedy(seed):
    _, _, kernel = random_kernel(seed)
    for k in (1, 7, 20):
        assert dpp_greedy(kernel, k).tolist() == slow_greedy(kernel, k)


def test_gain_is_the_schur_complement():
    """After each pick, the fast greedy's next choice maximises L_nn - L_nY L_YY^-1 L_Yn."""
    _, _, kernel = random_kernel(3, n=25, d=40)
    picked = []
    for k in range(1, 10):
        new = [i for i in dpp_greedy(kernel, k).tolist() if i not in picked]
        assert len(new) == 1
        rest = [n for n in range(25) if n not in picked]
        if picked:
            ly = kernel[picked][:, picked]
            schur = [
                float(kernel[n, n] - kernel[n, picked] @ torch.linalg.solve(ly, kernel[picked, n]))
                for n in rest
            ]
        else:
            schur = [float(kernel[n, n]) for n in rest]
        assert new[0] == rest[max(range(len(rest)), key=lambda i: (schur[i], -i))]
        picked.append(new[0])


def test_properties_and_guards():
    # orthonormal features (S = I): the selection is the top relevance
    x = torch.eye(12, dtype=torch.float64)
    r = torch.linspace(0.1, 1.0, 12, dtype=torch.float64)[
        torch.randperm(12, generator=torch.Generator().manual_seed(1))
    ]
    assert dpp_greedy(conditional_kernel(x, r), 4).tolist() == sorted(torch.topk(r, 4).indices.tolist())
    # rank-deficient features (d < k) and exact duplicates: k distinct items, no NaN
    g = torch.Generator().manual_seed(2)
    low = torch.randn(30, 3, generator=g, dtype=torch.float64)
    for feats in (low, torch.cat([low[:4]] * 5)):
        kernel = conditional_kernel(feats, torch.rand(len(feats), generator=g, dtype=torch.float64) + 0.1)
        picked = dpp_greedy(kernel, 10)
        assert len(set(picked.tolist())) == 10 and picked.tolist() == sorted(picked.tolist())
    assert dpp_greedy(kernel, 99).tolist() == list(range(len(kernel)))  # k >= N: everything, no greedy
    assert dpp_greedy(kernel, 0).numel() == 0


def test_spent_kernel_in_float32_falls_back_to_the_diagonal():
    """Rank 3 features: after three picks every gain is float32 rounding noise; the rest come by their
    own relevance (the kernel diagonal r^2), not by that noise."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 16, generator=g)[torch.randint(0, 3, (30,), generator=g)] + 1e-4 * torch.randn(
        30, 16, generator=g
    )
    r = torch.rand(30, generator=g) * 0.9 + 0.1
    kernel = conditional_kernel(feats, r)
    first = dpp_greedy(kernel.double(), 3).tolist()  # three directions: the greedy's own picks
    rest = [i for i in torch.sort(r, descending=True, stable=True).indices.tolist() if i not in first][:7]
    assert dpp_greedy(kernel, 10).tolist() == sorted(first + rest)


def test_relevance():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(10, 16, generator=g, dtype=torch.float64)
    text = feats[3:4] * 2.5  # one token points exactly at the text
    rel = relevance(feats, text)
    assert int(rel.argmax()) == 3 and float(rel.max()) == pytest.approx(
        1.0 + 1e-6 / float(rel.max() - rel.min()), rel=1e-3
    )
    assert float(rel.min()) > 0
    flipped = relevance(feats, text, negate=True)
    assert int(flipped.argmin()) == 3  # the reference's sign: the most similar token is the least relevant
    assert torch.equal(relevance(torch.ones(5, 4), torch.ones(1, 4)), torch.ones(5))  # range 0: no division


@pytest.mark.parametrize("adapter", ["llava", "qwen2-vl"])
def test_kept_tokens_equal_the_selection_on_the_input_embeddings(adapter):
    model, proc = build(adapter, num_layers=4)
    inputs = make_inputs(proc, [("What color is the car in the two pictures?", 2)])
    embeds = llm_input(model, inputs)
    method = lv.CDPruner(keep_ratio=0.3)
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
        kept = applied.trace.kept_visual[-1][0]
        report = lv.last_report(model)
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0]
    slots = visual.nonzero()[:, 0].tolist()
    runs = [[slots[0]]]
    for j in slots[1:]:
        runs[-1].append(j) if j == runs[-1][-1] + 1 else runs.append([j])
    if adapter == "llava":
        assert len(runs) == 2
    embeds = embeds[0].float()
    instruction = [j for j in range(visual.numel()) if j > slots[-1]]  # the text after the last image
    expected = []
    for run in runs:
        rel = relevance(embeds[run], embeds[instruction])
        picked = dpp_greedy(conditional_kernel(embeds[run], rel), round(0.3 * len(run)), resolution=1e-5)
        expected += [run[i] for i in picked.tolist()]
    assert kept.tolist() == expected
    assert report.selection > 0 and report.summary()["selection_flops"] == report.selection


def test_selection_follows_the_instruction():
    """Two prompts with one image and different questions keep different tokens (relevance counts)."""
    model, proc = build("llava", num_layers=3)
    kept = []
    for question in ("What is shown in this image?", "Read every word written on the red sign please."):
        inputs = make_inputs(proc, [(question, 1)])
        with lv.apply(model, lv.CDPruner(keep_ratio=0.25)) as applied, torch.no_grad():
            model(**inputs)
            kept.append(applied.trace.kept_visual[-1][0].tolist())
    assert kept[0] != kept[1]


def test_budgets():
    model, proc = build("llava", num_layers=3)
    inputs = make_inputs(proc, [("What is shown in this image?", 1)])
    n = int(lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None).sum())
    with (
        lv.apply(model, lv.CDPruner(keep_tokens=n + 1)),
        pytest.raises(
            lv.ConfigError,
            match=rf"CDPruner: keep_tokens={n + 1} is more than an image of this input has \({n} visual tokens\); allowed: 1..{n}",
        ),
    ):
        model(**inputs)
    with lv.apply(model, lv.CDPruner(keep_tokens=n)) as applied, torch.no_grad():  # everything, exactly
        model(**inputs)
        assert applied.trace.kept_visual[-1][0].numel() == n


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lv.CDPruner(keep_ratio=0), r"CDPruner: keep_ratio=0 is outside \(0, 1\]"),
        (lambda: lv.CDPruner(keep_ratio=1.5), r"CDPruner: keep_ratio=1.5 is outside \(0, 1\]"),
        (lambda: lv.CDPruner(keep_tokens=0), r"CDPruner: keep_tokens=0 must be an int >= 1"),
        (lambda: lv.CDPruner(theta=1.0), r"CDPruner: theta=1.0 is outside \(0, 1\)"),
        (lambda: lv.CDPruner(negate="yes"), r"CDPruner: negate='yes' must be True or False"),
        (lambda: lv.parse_method("cdpruner:text=question"), r"CDPruner: text='question' is not one of"),
        (lambda: lv.DivPrune(keep_tokens=0), r"DivPrune: keep_tokens=0 must be an int >= 1"),
    ],
)
def test_bad_settings(make, message):
    with pytest.raises(lv.ConfigError, match=message):
        make()


def test_reference_default_and_positions():
    assert lv.CDPruner().keep_count(576) == 64
    assert lv.CDPruner().resolved_positions(True) == "compact"
    assert lv.CDPruner().resolved_positions(False) == "original"
