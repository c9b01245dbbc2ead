"""DAPO dynamic sampling (filter, fill, limit) and the soft overlong punishment."""

import logging

import pytest
import torch

from megatron_papo.algos.dapo import (
    apply_overlong_penalty,
    fill_batch,
    group_mean,
    keep_group,
    keep_groups,
    keep_mask,
    overlong_penalty,
)


def test_keep_group_strict_bounds():
    assert keep_groups([0.0, 0.01, 0.2, 0.99, 1.0, 0.5]) == [False, False, True, False, False, True]
    assert keep_group(0.005, low=0.0, high=1.0) and not keep_group(0.0, low=0.0, high=1.0)


def test_keep_mask_per_response():
    acc = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    ids = ["a", "a", "b", "b", "c", "c", "d", "d"]  # means: a=1 (drop), b=0.5, c=0 (drop), d=1 (drop)
    assert keep_mask(acc, ids).tolist() == [False, False, True, True, False, False, False, False]


def _drawer(draws):
    it = iter(draws)
    return lambda: next(it)


def test_fill_draws_until_full_and_truncates():
    # groups are (name, mean accuracy); keep_fn applies the (0.01, 0.99) filter
    draws = [[("a", 1.0), ("b", 0.4)], [("c", 0.0), ("d", 0.6), ("e", 0.2)], [("f", 0.5)]]
    res = fill_batch(_drawer(draws), target_groups=2, max_tries=20, keep_fn=lambda g: keep_group(g[1]))
    assert [g[0] for g in res.groups] == ["b", "d"]
    assert (res.tries, res.drawn, res.kept, res.full, res.kept_per_try) == (2, 5, 3, True, [1, 2])


def test_fill_prefiltered_draws():
    res = fill_batch(_drawer([[1, 2, 3, 4, 5]]), target_groups=3, max_tries=1)
    assert res.groups == [1, 2, 3] and res.full and res.tries == 1


def test_fill_limit_raises_with_clear_message():
    draws = [[("a", 1.0)], [("b", 0.5)], [("c", 0.0)]]
    with pytest.raises(RuntimeError, match=r"only 1/2 groups passed the filter after 3 draws .*dynamic_sampling_max_tries"):
        fill_batch(_drawer(draws), target_groups=2, max_tries=3, keep_fn=lambda g: keep_group(g[1]))


def test_fill_limit_warns_and_returns_partial(caplog, monkeypatch):
    draws = [[("a", 1.0)], [("b", 0.5)]]
    monkeypatch.setattr(logging.getLogger("megatron_papo"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="megatron_papo"):
        res = fill_batch(_drawer(draws), target_groups=2, max_tries=2, keep_fn=lambda g: keep_group(g[1]), on_limit="warn")
    assert [g[0] for g in res.groups] == ["b"] and not res.full and res.tries == 2
    assert "partial batch" in caplog.text
    with pytest.raises(RuntimeError, match="only 0/2"):
        fill_batch(_drawer([[("a", 1.0)]]), target_groups=2, max_tries=1, keep_fn=lambda g: keep_group(g[1]), on_limit="warn")


def test_fill_unlimited_tries():
    draws = [[("x", 1.0)]] * 30 + [[("y", 0.5)]]
    res = fill_batch(_drawer(draws), target_groups=1, max_tries=0, keep_fn=lambda g: keep_group(g[1]))
    assert res.tries == 31 and res.groups == [("y", 0.5)]


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([10, 80, 90, 95, 100, 120])
    # max 100, buffer 20 -> expected 80: 0, 0, -10/20, -15/20, -1, beyond max capped at -penalty
    assert overlong_penalty(lengths, 100, 20).tolist() == [0.0, 0.0, -0.5, -0.75, -1.0, -1.0]
    assert overlong_penalty(lengths, 100, 20, penalty=0.5).tolist() == [0.0, 0.0, -0.25, -0.375, -0.5, -0.5]
    assert overlong_penalty(lengths, 100, 0).tolist() == [0.0] * 6   # off by default
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 10, 20)


def test_overlong_penalty_at_the_dapo_paper_lengths():
    # DAPO trains with L_max = 20480 and L_cache = 4096: no penalty up to 16384 tokens, then linear to -1 at 20480
    lengths = torch.tensor([16000, 16384, 16385, 18432, 20480, 20481])
    got = overlong_penalty(lengths, 20480, 4096).tolist()
    assert got == [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0]


def test_apply_overlong_penalty_shapes_scores_and_counts_the_penalised():
    scores = torch.tensor([1.0, 0.1, 0.9, 0.0])
    # max 4, buffer 2, factor 0.5: lengths 1, 2 free; 3 -> (2 - 3) / 2 * 0.5 = -0.25; 4 -> -0.5
    shaped, frac = apply_overlong_penalty(scores, torch.tensor([1, 2, 3, 4]), 4, 2, 0.5)
    assert torch.allclose(shaped, torch.tensor([1.0, 0.1, 0.65, -0.5]), rtol=0, atol=1e-7) and frac == 0.5
    same, frac0 = apply_overlong_penalty(scores, torch.tensor([1, 2, 3, 4]), 4, 0)
    assert torch.equal(same, scores) and frac0 == 0.0


def test_group_mean_reads_the_named_component():
    rewards = [{"overall": 1.0, "accuracy": 1.0, "format": 1.0}, {"overall": 0.9, "accuracy": 1.0, "format": 0.0},
               {"overall": 0.1, "accuracy": 0.0, "format": 1.0}, {"overall": 0.0, "accuracy": 0.0, "format": 0.0}]
    assert group_mean(rewards, "accuracy") == 0.5 and group_mean(rewards, "format") == 0.5
    assert group_mean(rewards, "overall") == 0.5
    assert group_mean(rewards[:2], "accuracy") == 1.0 and group_mean(rewards[:2], "format") == 0.5  # keys disagree
    assert not keep_group(group_mean(rewards[:2], "accuracy")) and keep_group(group_mean(rewards[:2], "format"))
    with pytest.raises(KeyError, match="'overlong' is not in the rewards .*dynamic_sampling_key"):
        group_mean(rewards, "overlong")
