"""SparseVLM: the raters and the kept set against the stock model's eager attentions, the recycled
tokens against a hand-computed merge, the clustering against plain loops, budgets and bad settings."""

from __future__ import annotations

import pytest
import torch
from models import build, llm_input, make_inputs

import leanvlm as lv
from leanvlm.methods.sparsevlm import recycled
from leanvlm.ops.cluster import dpc_knn

PROMPT = [("Describe the picture in detail and say how many people are in the photo.", 1)]


def plain_dpc_knn(x: torch.Tensor, clusters: int, k: int) -> list[int]:
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / d**0.5 for j in range(n)] for i in range(n)]
    density = [torch.exp(-torch.tensor(sorted(row)[:k]).pow(2).mean()).item() for row in dist]
    top = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(n) if density[j] > density[i]], default=top) for i in range(n)]
    score = [delta[i] * density[i] for i in range(n)]
    centres = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:clusters])
    assign = [min(range(clusters), key=lambda c: (dist[i][centres[c]], c)) for i in range(n)]
    for c, i in enumerate(centres):
        assign[i] = c
    return assign


@pytest.mark.parametrize("seed", range(5))
def test_clustering_equals_plain_loops(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(25, 6, generator=g, dtype=torch.float64)
    for clusters in (1, 3, 7):
        assert dpc_knn(x, clusters, clusters).tolist() == plain_dpc_knn(x, clusters, clusters)
    centres = torch.eye(3, 6, dtype=torch.float64) * 20  # three far-apart groups: one cluster each
    groups = torch.cat(
        [centres + 0.01 * torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    )
    assign = dpc_knn(groups, 3, 3)
    assert all(len({int(assign[i]) for i in range(c, 12, 3)}) == 1 for c in range(3))
    assert len(set(assign.tolist())) == 3


def raters_by_hand(embeds: torch.Tensor, visual: torch.Tensor) -> list[int]:
    v = visual.nonzero()[:, 0]
    text = [j for j in range(int(v[-1]) + 1, embeds.shape[0])]  # the instruction: after the image
    relation = torch.softmax(embeds[v].float() @ embeds[text].float().T, -1).mean(0)
    return [t for t, r in zip(text, relation.tolist(), strict=True) if r > float(relation.mean())]


def stock_scores(model, inputs, layer: int, raters: list[int]) -> torch.Tensor:
    """[N] the raters' attention at ``layer`` of the stock model (eager attentions), heads and raters
    averaged."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return out.attentions[layer][0][:, raters].mean(dim=(0, 1))


@pytest.mark.parametrize("adapter", ["llava", "qwen2-vl"])
def test_first_stage_keeps_the_raters_top_attended(adapter):
    model, proc = build(adapter, attn="eager", num_layers=5)
    inputs = make_inputs(proc, PROMPT)
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0]
    raters = raters_by_hand(llm_input(model, inputs)[0], visual)
    assert 0 < len(raters) < int((~visual).sum())
    scores = stock_scores(model, inputs, 1, raters)
    method = lv.SparseVLM(keep_ratio=0.5, layers=(1, 3), recycle=False)
    with lv.apply(model, method) as applied, torch.no_grad():
        model(**inputs)
        kept = applied.trace.kept_visual[1][0]
    n = int(visual.sum())
    k = method.stage_counts(n, 5)[0]
    slots = visual.nonzero()[:, 0]
    expected = slots[torch.sort(scores[slots], descending=True, stable=True).indices[:k]].sort().values
    assert torch.equal(kept, expected)


def test_recycled_tokens_are_the_mean_of_their_cluster():
    model, proc = build("llava", attn="eager", num_layers=5)
    inputs = make_inputs(proc, PROMPT)
    visual = lv.registry.find_adapter(model).visual_mask(inputs["input_ids"], None)[0]
    raters = raters_by_hand(llm_input(model, inputs)[0], visual)
    scores = stock_scores(model, inputs, 1, raters)
    with torch.no_grad():
        out_1 = model(**inputs, output_hidden_states=True).hidden_states[2][0]  # layer 1's output
    method = lv.SparseVLM(keep_ratio=0.5, layers=(1, 3))
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"])[0].detach().clone())

    with lv.apply(model, method) as applied, torch.no_grad():
        hook = model.model.language_model.layers[2].register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        hook.remove()
        stage = applied.trace.kept_visual[1][0]
    n = int(visual.sum())
    k = method.stage_counts(n, 5)[0]
    slots = visual.nonzero()[:, 0]
    order = torch.sort(scores[slots], descending=True, stable=True).indices
    kept, pruned = slots[order[:k]], slots[order[k:]]
    r, c = recycled(len(pruned))
    members = pruned[:r].sort().values  # the best-scored pruned ones
    groups = dpc_knn(out_1[members], c, c)
    heads = sorted(int(members[groups == g][0]) for g in range(c))
    assert stage.tolist() == sorted(kept.tolist() + heads)  # a cluster sits at its earliest member
    text = [j for j in range(visual.numel()) if not visual[j]]
    sequence = sorted(text + stage.tolist())
    for g in range(c):
        group = members[groups == g]
        torch.testing.assert_close(seen["h"][sequence.index(int(group[0]))], out_1[group].mean(0))


def test_budgets_follow_the_reference_table():
    method = lv.SparseVLM()  # 192
    assert method.stage_counts(576, 32) == [300, 200, 110]
    assert lv.SparseVLM(keep_tokens=64).stage_counts(576, 32) == [66, 30, 17]
    assert lv.SparseVLM(keep_tokens=128).stage_counts(288, 32) == [152, 55, 18]  # scaled by N / 576
    schedule = method.visual_schedule(32, [576])
    clusters = [recycled(276)[1], recycled(300 + recycled(276)[1] - 200)[1]]
    assert schedule[:3] == [576] * 3 and schedule[3] == 300 + clusters[0]
    assert schedule[7] == 200 + clusters[1]
    ratio = lv.SparseVLM(keep_ratio=0.35)
    assert sum(ratio.visual_schedule(32, [576])) / 32 == pytest.approx(0.35 * 576, rel=0.05)
    assert lv.SparseVLM.at_budget(0.5, 32) == lv.SparseVLM(keep_tokens=None, keep_ratio=0.5)
    assert lv.SparseVLM.scaled_layers(4) == (0, 1, 2) and lv.SparseVLM.scaled_layers(16) == (1, 3, 8)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: lv.SparseVLM(keep_tokens=100),
            r"SparseVLM: keep_tokens=100 is not one of .*192, 128, 96, 64",
        ),
        (lambda: lv.SparseVLM(keep_ratio=0), r"SparseVLM: keep_ratio=0 is outside \(0, 1\]"),
        (
            lambda: lv.SparseVLM(keep_tokens=64, keep_ratio=0.3),
            r"SparseVLM: give keep_tokens=64 or keep_ratio",
        ),
        (lambda: lv.SparseVLM(layers=(6, 2, 15)), r"SparseVLM: layers=\(6, 2, 15\) must be increasing"),
        (lambda: lv.SparseVLM(layers=(2, 6)), r"SparseVLM: layers=\(2, 6\) has 2 stages; keep_tokens=192"),
        (lambda: lv.SparseVLM(recycle="no"), r"SparseVLM: recycle='no' must be True or False"),
        (
            lambda: lv.SparseVLM().check_model(8),
            r"SparseVLM: layers=\(2, 6, 15\) has layer 15, outside \[0, 6\] for this model \(8 decoder layers",
        ),
        (
            lambda: lv.SparseVLM(keep_ratio=0.05).check_model(32),
            r"SparseVLM: keep_ratio=0.05 is outside \(0.0938, 1\]",
        ),
    ],
)
def test_bad_settings(make, message):
    with pytest.raises(lv.ConfigError, match=message):
        make()
