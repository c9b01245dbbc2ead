"""k1/k2/k3 estimators, clamp regions and gradients (papo_spec §2.4)."""

import math

import pytest
import torch

from megatron_papo.algos.kl import kl_estimate


def _run(name, l_vals, ref_vals, **kw):
    lp = torch.tensor(l_vals, dtype=torch.float64, requires_grad=True)
    v = kl_estimate(name, lp, torch.tensor(ref_vals, dtype=torch.float64), **kw)
    v.sum().backward()
    return v.detach(), lp.grad


def test_hand_values_inside_clamps():
    # x = l_ref - l = [-1, +1]
    lp, ref = [-1.0, -2.0], [-2.0, -1.0]
    k1, g1 = _run("k1", lp, ref)
    assert k1.tolist() == [1.0, -1.0] and g1.tolist() == [1.0, 1.0]
    k2, g2 = _run("k2", lp, ref)
    assert k2.tolist() == [0.5, 0.5] and g2.tolist() == [1.0, -1.0]  # d/dl x^2/2 = -x
    k3, g3 = _run("k3", lp, ref)
    torch.testing.assert_close(k3, torch.tensor([math.exp(-1), math.e - 2], dtype=torch.float64))
    torch.testing.assert_close(g3, torch.tensor([1 - math.exp(-1), 1 - math.e], dtype=torch.float64))  # 1 - e^x


def test_value_clamp_zeroes_grad():
    # x = 3: k3 = e^3 - 4 = 16.09 > 10 -> 10, gradient 0
    k3, g = _run("k3", [0.0], [3.0])
    assert k3.tolist() == [10.0] and g.tolist() == [0.0]
    k3, _ = _run("k3", [0.0], [3.0], value_clamp=None)
    assert k3.item() == pytest.approx(math.exp(3) - 4, abs=1e-12)
    # k1: x = -15 -> 15 -> 10 ; x = 12 -> -12 -> -10
    k1, g = _run("k1", [0.0, 0.0], [-15.0, 12.0])
    assert k1.tolist() == [10.0, -10.0] and g.tolist() == [0.0, 0.0]


def test_log_ratio_clamp():
    # x = -25 -> -20: k3 = e^-20 + 19 (no value clamp); gradient 0 (log-ratio clamped)
    k3, g = _run("k3", [0.0], [-25.0], value_clamp=None)
    assert k3.item() == pytest.approx(math.exp(-20) + 19, abs=1e-12) and g.tolist() == [0.0]
    k3, _ = _run("k3", [0.0], [-25.0], value_clamp=None, log_ratio_clamp=None)
    assert k3.item() == pytest.approx(math.exp(-25) + 24, abs=1e-12)
    k2, _ = _run("k2", [0.0], [-25.0], value_clamp=None)
    assert k2.item() == 200.0
    k2, _ = _run("k2", [0.0], [-25.0])
    assert k2.item() == 10.0


def test_float32_promotion_and_unknown():
    v = kl_estimate("k3", torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16))
    assert v.dtype == torch.float32
    with pytest.raises(KeyError, match="known: k1, k2, k3"):
        kl_estimate("low_var_kl", torch.zeros(1), torch.zeros(1))
