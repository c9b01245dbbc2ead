"""Advantage estimators against hand-computed values (papo_spec §2.2)."""

import math

import pytest
import torch

from megatron_papo.algos.advantages import compute_advantages

# groups: a = [1, 2, 1] (idx 0, 2, 3), b = [0, 0.5] (idx 1, 4), c = [3] (singleton, idx 5)
SCORES = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
IDS = ["a", "b", "a", "a", "b", "c"]


def test_grpo_hand_values():
    std_a = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased: sqrt(1/3)
    std_b = math.sqrt((0.25**2 * 2) / 1)
    expected = [(-1 / 3) / (std_a + 1e-6), -0.25 / (std_b + 1e-6), (2 / 3) / (std_a + 1e-6),
                (-1 / 3) / (std_a + 1e-6), 0.25 / (std_b + 1e-6), 0.0]
    for name in ("grpo", "dapo"):
        adv = compute_advantages(name, SCORES, IDS)
        torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert abs(std_a - 0.5773502691896258) < 1e-15


def test_grpo_identical_group_and_tensor_ids():
    adv = compute_advantages("grpo", torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([7, 7, 9, 9]))
    assert adv[:2].tolist() == [0.0, 0.0]
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv[2:], torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-6))


def test_drgrpo_and_rloo_hand_values():
    dr = compute_advantages("drgrpo", SCORES, IDS)
    torch.testing.assert_close(dr, torch.tensor([-1 / 3, -0.25, 2 / 3, -1 / 3, 0.25, 0.0], dtype=torch.float64))
    # rloo: a: 1 - (2+1)/2, 2 - (1+1)/2, 1 - 1.5; b: 0 - 0.5, 0.5 - 0; c: singleton -> 0
    rl = compute_advantages("rloo", SCORES, IDS)
    torch.testing.assert_close(rl, torch.tensor([-0.5, -0.5, 1.0, -0.5, 0.5, 0.0], dtype=torch.float64))


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="known: dapo, drgrpo, grpo, rloo"):
        compute_advantages("ppo", SCORES, IDS)


def test_length_mismatch():
    with pytest.raises(ValueError, match="group_ids has 2"):
        compute_advantages("grpo", SCORES, ["a", "b"])
