"""Aggregation modes: hand values, and the micro-batch / DP summation contract."""

import pytest
import torch

from megatron_papo.algos.aggregate import aggregate, count_normalisers

V = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 1], [1, 0, 0]])  # the 5 is padding


def test_hand_values_local():
    assert aggregate(V, M, "token_mean").item() == 2.5                      # (1+2+3+4)/4
    assert aggregate(V, M, "microbatch_token_mean").item() == 2.5
    assert aggregate(V, M, "seq_mean_token_mean").item() == 3.0             # (2 + 4)/2
    assert aggregate(V, M, "seq_mean_token_sum").item() == 5.0              # (6 + 4)/2


def test_hand_values_global_normalisers():
    assert aggregate(V, M, "token_mean", global_tokens=8).item() == 1.25
    assert aggregate(V, M, "microbatch_token_mean", num_microbatches=2).item() == 1.25
    assert aggregate(V, M, "seq_mean_token_mean", global_seqs=4).item() == 1.5
    assert aggregate(V, M, "seq_mean_token_sum", global_seqs=4).item() == 2.5


def test_padding_nan_inf_ignored_and_grad_finite():
    v = V.clone()
    v[1, 1], v[1, 2] = float("nan"), float("-inf")
    v.requires_grad_(True)
    out = aggregate(v, M, "token_mean")
    out.backward()
    assert out.item() == 2.5 and torch.isfinite(v.grad).all()
    assert v.grad.tolist() == [[0.25, 0.25, 0.25], [0.25, 0.0, 0.0]]


def test_empty_sequence_not_counted():
    m = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert count_normalisers(m) == (3, 1)
    assert aggregate(V, m, "seq_mean_token_mean").item() == 2.0


@pytest.mark.parametrize("mode", ["token_mean", "microbatch_token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_sum_over_microbatches_and_ranks_equals_minibatch_objective(mode):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, 5, generator=g, dtype=torch.float64)
    lengths = [5, 3, 1, 4, 2, 5, 2, 3]
    m = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).long()
    # 2 DP ranks x 2 micro-batches of 2 sequences each
    shards = [(v[i:i + 2], m[i:i + 2]) for i in range(0, 8, 2)]
    tokens = sum(count_normalisers(mm)[0] for _, mm in shards)
    seqs = sum(count_normalisers(mm)[1] for _, mm in shards)
    total = sum(aggregate(vv, mm, mode, global_tokens=tokens, global_seqs=seqs, num_microbatches=len(shards))
                for vv, mm in shards)
    # independent definitions of each mini-batch objective
    per_tok = [[v[i, t].item() for t in range(lengths[i])] for i in range(8)]
    if mode == "token_mean":
        expected = sum(sum(r) for r in per_tok) / sum(lengths)
    elif mode == "microbatch_token_mean":
        mbs = [per_tok[i] + per_tok[i + 1] for i in range(0, 8, 2)]
        expected = sum(sum(x) / len(x) for x in mbs) / 4
    elif mode == "seq_mean_token_mean":
        expected = sum(sum(r) / len(r) for r in per_tok) / 8
    else:
        expected = sum(sum(r) for r in per_tok) / 8
    assert total.item() == pytest.approx(expected, rel=1e-12)


def test_errors():
    with pytest.raises(KeyError, match="known: microbatch_token_mean, seq_mean_token_mean"):
        aggregate(V, M, "token")
    with pytest.raises(ValueError, match="shape"):
        aggregate(V, M[:1], "token_mean")
