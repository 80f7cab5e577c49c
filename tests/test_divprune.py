"""DivPrune: the greedy max-min selection against a brute-force oracle, its properties, and the tokens
the method keeps on a model against the selection run by hand on the model's own input embeddings."""

from __future__ import annotations

import pytest
import torch
from models import PROMPTS, build, llm_input, make_inputs

import leanvlm as lv
from leanvlm.ops.diversity import max_min_select


def brute_force(x: torch.Tensor, k: int) -> list[int]:
    """Plain loops in float64: step 0 the row farthest from its nearest neighbour, then the row whose
    minimum distance to the selected rows is largest; ties to the lowest index."""
    n = x.shape[0]
    unit = [r / r.norm() for r in x.double()]
    dist = [[1 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    selected = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(selected) < k:
        rest = [i for i in range(n) if i not in selected]
        selected.append(max(rest, key=lambda i: (min(dist[s][i] for s in selected), -i)))
    return sorted(selected)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    for k in (1, 5, 17, 29):
        assert max_min_select(x, k).tolist() == brute_force(x, k)


def test_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    picked = max_min_select(x, 10)
    assert picked.tolist() == sorted(set(picked.tolist())) and len(picked) == 10
    perm = torch.randperm(40, generator=g)
    assert sorted(perm[max_min_select(x[perm], 10)].tolist()) == picked.tolist()  # permutation equivariant
    scale = torch.rand(40, 1, generator=g, dtype=torch.float64) + 0.1
    assert torch.equal(max_min_select(x * scale, 10), picked)  # cosine: per-row scale does not matter
    centres = torch.eye(4, 8, dtype=torch.float64) * 10  # four well-separated clusters, one token from each
    clusters = torch.cat(
        [centres + 0.01 * torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(5)]
    )
    assert sorted(int(i) % 4 for i in max_min_select(clusters, 4)) == [0, 1, 2, 3]
    dup = torch.cat([x[:3], x[:3], x[:3]])  # exact duplicates: never the same row twice
    assert len(set(max_min_select(dup, 9).tolist())) == 9
    assert max_min_select(x, 0).numel() == 0 and max_min_select(x, 99).tolist() == list(range(40))


@pytest.mark.parametrize("adapter", ["llava", "qwen2-vl"])
def test_kept_tokens_equal_the_selection_on_the_input_embeddings(adapter):
    model, proc = build(adapter, num_layers=5)
    inputs = make_inputs(proc, PROMPTS[3:4])  # two images: each keeps its own share
    embeds = llm_input(model, inputs)
    method = lv.DivPrune(keep_ratio=0.3)
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
        kept = applied.trace.kept_visual[-1][0]
        per_layer = applied.trace.visual_per_layer[0]
        report = lv.last_report(model)
    adapter_ = lv.registry.find_adapter(model)
    visual = adapter_.visual_mask(inputs["input_ids"], None)[0]
    runs, start = [], None
    for j, v in enumerate([*visual.tolist(), False]):
        if v and start is None:
            start = j
        elif not v and start is not None:
            runs.append(list(range(start, j)))
            start = None
    assert len(runs) == 2
    expected = []
    for run in runs:
        feats = embeds[0, run].float()
        expected += [run[i] for i in max_min_select(feats, round(0.3 * len(run)), resolution=1e-5).tolist()]
    assert kept.tolist() == expected
    assert per_layer == [len(expected)] * 5 == method.visual_schedule(5, [len(r) for r in runs])
    d = embeds.shape[-1]
    cost = sum(2 * len(r) ** 2 * d + 3 * len(r) * d + 2 * round(0.3 * len(r)) * len(r) for r in runs)
    assert report.selection == cost and report.summary()["selection_flops"] == cost
    assert report.summary()["visual_tokens_in"] == sum(len(r) for r in runs)  # what the projector made


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lv.DivPrune(keep_ratio=0), r"DivPrune: keep_ratio=0 is outside \(0, 1\]"),
        (lambda: lv.DivPrune(keep_tokens=-1), r"DivPrune: keep_tokens=-1 must be an int >= 1"),
        (lambda: lv.parse_method("divprune:positions=middle"), r"DivPrune: positions='middle' is not one of"),
    ],
)
def test_bad_settings(make, message):
    with pytest.raises(lv.ConfigError, match=message):
        make()


def test_reference_default_and_positions():
    assert lv.DivPrune().keep_count(576) == 56  # round(0.098 * 576), the reference's default
    assert lv.DivPrune().resolved_positions(True) == "compact"  # the reference numbers the short sequence
    assert lv.DivPrune().resolved_positions(False) == "original"  # M-RoPE: the kept tokens' (t, h, w)
