"""DAPO dynamic sampling (filter, fill, limit) and the soft overlong punishment."""

import logging

import pytest
import torch

from megatron_papo.algos.dapo import fill_batch, keep_group, keep_groups, keep_mask, overlong_penalty


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
