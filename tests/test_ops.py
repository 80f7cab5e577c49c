"""Pure tensor ops against naive implementations."""

import torch

from leanvlm.ops import attention_to_keys, compact_indices, mean_query_scores, topk_keep


def test_attention_to_keys_matches_full_attention_with_gqa():
    torch.manual_seed(0)
    b, h, h_kv, n, d = 2, 8, 2, 11, 16
    q_all = torch.randn(b, h, n, d)
    k = torch.randn(b, h_kv, n, d)
    scaling = d**-0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :3] = False  # left padding in sample 1
    full_mask = causal[None] & valid[:, None, :]
    # naive: repeat keys for every head (head h reads kv head h // (h / h_kv)), full matrix, softmax
    k_rep = k.repeat_interleave(h // h_kv, dim=1)
    logits = (q_all @ k_rep.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~full_mask[:, None], float("-inf"))
    naive = torch.softmax(logits, -1).mean(1)  # [B, n, n]
    rows = torch.tensor([[n - 1, 5], [n - 1, 7]])
    q_rows = q_all.gather(2, rows[:, None, :, None].expand(-1, h, -1, d))
    visible = full_mask.gather(1, rows[..., None].expand(-1, -1, n))
    ours = attention_to_keys(q_rows, k, visible, scaling)
    torch.testing.assert_close(ours, naive.gather(1, rows[..., None].expand(-1, -1, n)))
    assert torch.all(ours[1, :, :3] == 0)  # padding receives nothing
    mean = mean_query_scores(ours, torch.tensor([[True, True], [True, False]]))
    torch.testing.assert_close(mean[1], ours[1, 0])
    torch.testing.assert_close(mean[0], ours[0].mean(0))


def test_topk_keep_keeps_best_candidates_and_all_others():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7, 0.0], [0.2, 0.8, 0.4, 0.6, 0.1, 0.3]])
    cand = torch.tensor([[False, True, True, True, True, False], [True, True, True, True, True, True]])
    keep = topk_keep(scores, cand, torch.tensor([2, 3]))
    assert keep.tolist() == [
        [True, False, True, False, True, True],
        [False, True, True, True, False, False],
    ]


def test_topk_keep_breaks_ties_towards_earlier_tokens():
    keep = topk_keep(torch.zeros(1, 5), torch.ones(1, 5, dtype=torch.bool), torch.tensor([2]))
    assert keep.tolist() == [[True, True, False, False, False]]


def test_compact_indices_left_pads_shorter_samples():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, present = compact_indices(keep)
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]]
    assert present.tolist() == [[True, True, True], [False, False, True]]
