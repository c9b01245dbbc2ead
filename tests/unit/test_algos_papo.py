"""PAPO perception-KL pieces: estimators, top-p mask, clip, gamma schedule (papo_spec §2.5, §2.9, §3)."""

import math

import pytest
import torch

from megatron_papo.algos.papo import (
    entropy_discount,
    kl_prcp_gamma,
    kl_prcp_per_token,
    shape_kl_prcp,
    top_p_token_mask,
)


def test_k3_sampled_ratio_is_masked_over_original():
    lp = torch.tensor([[-1.0, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    l_aug = torch.tensor([[-2.0, -1.0, 3.0]], dtype=torch.float64)   # y = l_aug - lp = [-1, 1, 3]
    kl = kl_prcp_per_token(lp, aug_logprob_BT=l_aug)
    exp = [math.exp(-1) - (-1) - 1, math.exp(1) - 1 - 1, 10.0]         # the last hits the cap 10
    torch.testing.assert_close(kl.detach(), torch.tensor([exp], dtype=torch.float64))
    kl.sum().backward()
    # d/dl [e^y - y - 1] = -(e^y - 1) = 1 - pi_mask/pi_theta; capped token: 0
    torch.testing.assert_close(lp.grad, torch.tensor([[1 - math.exp(-1), 1 - math.e, 0.0]], dtype=torch.float64))


def test_exact_passthrough_with_cap_and_missing_inputs():
    ex = torch.tensor([[0.3, 12.0]])
    assert kl_prcp_per_token(torch.zeros(1, 2), estimator="exact", kl_exact_BT=ex).tolist() == [[pytest.approx(0.3), 10.0]]
    with pytest.raises(ValueError, match="needs kl_exact"):
        kl_prcp_per_token(torch.zeros(1, 2), estimator="exact")
    with pytest.raises(ValueError, match="needs aug_logprob"):
        kl_prcp_per_token(torch.zeros(1, 2))
    with pytest.raises(KeyError, match="known: k3_sampled, exact"):
        kl_prcp_per_token(torch.zeros(1, 2), estimator="k1")


def test_top_p_mask_per_sequence_quantile():
    v = torch.tensor([[0.1, 0.5, 0.3, 0.9, 7.0], [1.0, 2.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    # row 0 valid = [0.1, 0.3, 0.5, 0.9]: median (linear) = 0.4 -> keep 0.5, 0.9; pad 7.0 never kept
    # row 1 valid = [1, 2]: median 1.5 -> keep 2
    assert top_p_token_mask(v, m, 0.5).tolist() == [[0, 1, 0, 1, 0], [0, 1, 0, 0, 0]]
    # 0.8 quantile of row 0: position 2.4 -> 0.5 + 0.4 * 0.4 = 0.66 -> keep 0.9 only
    assert top_p_token_mask(v, m, 0.2).tolist()[0] == [0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="top_p"):
        top_p_token_mask(v, m, 1.0)


def test_shape_order_mask_then_clip():
    v = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    m = torch.ones(1, 4)
    torch.testing.assert_close(shape_kl_prcp(v, m, top_p=0.5, clip=0.4), torch.tensor([[0.0, 0.4, 0.0, 0.4]]))
    torch.testing.assert_close(shape_kl_prcp(v, m, clip=0.2), torch.tensor([[0.1, 0.2, 0.2, 0.2]]))
    assert shape_kl_prcp(v, m) is v


def test_gamma_schedules_and_discount():
    assert kl_prcp_gamma(7, 100, schedule="constant", coef=0.02) == 0.02
    # 0.02 -> 0 over int(100 * 0.5) = 50 steps, step counted from 0, flat afterwards
    g = [kl_prcp_gamma(s, 100, schedule="annealing", coef=0.02, ratio=0.5) for s in (0, 25, 50, 80)]
    assert g == pytest.approx([0.02, 0.01, 0.0, 0.0], abs=1e-15)
    assert kl_prcp_gamma(10, 100, schedule="annealing", coef=0.02, start=0.04, end=0.01, ratio=0.2) == pytest.approx(0.025)
    assert kl_prcp_gamma(0, 1, schedule="annealing", coef=0.02, ratio=0.1) == 0.02  # anneal steps >= 1
    assert entropy_discount(0.01, 0.02) == 0.5 and entropy_discount(0.02, 0.02) == 1.0 and entropy_discount(0.0, 0.0) == 1.0
    with pytest.raises(KeyError, match="known: constant, annealing"):
        kl_prcp_gamma(0, 10, schedule="fixed")


def test_k3_sampled_expectation_equals_exact_kl_original_vs_masked():
    """E_{y ~ p}[k3 with ratio q/p] = KL(p || q) exactly: both estimators measure the same direction."""
    g = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)   # original view, 4 tokens
    logq = torch.log_softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)   # masked view
    exact = (logp.exp() * (logp - logq)).sum(-1)
    per_y = kl_prcp_per_token(logp, aug_logprob_BT=logq, value_clamp=None)              # k3 for every vocab entry
    torch.testing.assert_close((logp.exp() * per_y).sum(-1), exact, rtol=1e-12, atol=1e-14)


def test_gradient_directions_of_the_perception_term():
    """papo_spec §3.4: minimising -gamma*k3 raises l where pi_theta > pi_mask and lowers it where pi_mask > pi_theta."""
    lp = torch.tensor([[-0.5, -2.0]], dtype=torch.float64, requires_grad=True)
    l_aug = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    (-0.1 * kl_prcp_per_token(lp, aug_logprob_BT=l_aug).sum()).backward()
    descent = -lp.grad[0]
    assert descent[0] > 0 and descent[1] < 0
    assert abs(lp.grad[0, 0].item()) < 0.1    # bounded by gamma on the pi_theta > pi_mask side
