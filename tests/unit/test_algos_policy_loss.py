"""PPO clipped surrogate: every branch by hand (papo_spec §2.3), eps 0.2/0.3, dual-clip 3."""

import math

import pytest
import torch

from megatron_papo.algos.policy_loss import ppo_clip_loss

# (A, ratio, expected loss, dloss/dl, clip_high, clip_low)
CASES = [
    (1.0, 1.1, -1.1, -1.1, 0, 0),    # A > 0, inside the trust region
    (1.0, 1.5, -1.3, 0.0, 1, 0),     # A > 0, ratio above 1 + eps_high: clipped
    (1.0, 0.5, -0.5, -0.5, 0, 0),    # A > 0, ratio low: pessimistic max keeps the unclipped term
    (-1.0, 0.5, 0.8, 0.0, 1, 0),     # A < 0, ratio below 1 - eps_low: clipped; dual inactive (0.8 < 3)
    (-1.0, 2.0, 2.0, 2.0, 0, 0),     # A < 0, ratio high, below dual cap: unclipped, loss = -A r
    (-1.0, 4.0, 3.0, 0.0, 0, 1),     # A < 0, -A r = 4 > c*|A| = 3: dual-clip active, loss capped at 3
    (-2.0, 1.0, 2.0, 2.0, 0, 0),     # A < 0, ratio 1
    (0.0, 1.7, 0.0, 0.0, 0, 0),      # A = 0: nothing
]


def test_all_branches_by_hand():
    adv = torch.tensor([c[0] for c in CASES], dtype=torch.float64)
    lp = torch.tensor([math.log(c[1]) for c in CASES], dtype=torch.float64).unsqueeze(0).requires_grad_(True)
    out = ppo_clip_loss(lp, torch.zeros_like(lp), adv.unsqueeze(0), clip_low=0.2, clip_high=0.3, clip_dual=3.0)
    out.loss_BT.sum().backward()
    exp = torch.tensor([[c[2] for c in CASES]], dtype=torch.float64)
    torch.testing.assert_close(out.loss_BT.detach(), exp, rtol=0, atol=1e-12)
    torch.testing.assert_close(lp.grad, torch.tensor([[c[3] for c in CASES]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert out.clip_high_BT.tolist() == [[float(c[4]) for c in CASES]]
    assert out.clip_low_BT.tolist() == [[float(c[5]) for c in CASES]]
    torch.testing.assert_close(out.ppo_kl_BT, -lp.detach())


def test_advantage_broadcast_from_B_and_old_logprob():
    lp = torch.log(torch.tensor([[1.1, 1.5], [0.5, 4.0]]))
    old = torch.full_like(lp, -0.7)
    out = ppo_clip_loss(lp + -0.7, old, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out.loss_BT, torch.tensor([[-1.1, -1.3], [0.8, 3.0]]))
    assert out.clip_high_BT.shape == (2, 2)


def test_log_ratio_clamp_and_eps_high_028():
    lp = torch.tensor([[25.0, -25.0, math.log(1.5)]], requires_grad=True)
    out = ppo_clip_loss(lp, torch.zeros_like(lp), torch.tensor([[1.0, -1.0, 1.0]]), clip_high=0.28)
    assert out.ppo_kl_BT.tolist()[0][:2] == [-20.0, 20.0]
    torch.testing.assert_close(out.loss_BT.detach(), torch.tensor([[-1.28, 0.8, -1.28]]))
    out.loss_BT.sum().backward()
    assert lp.grad.tolist() == [[0.0, 0.0, 0.0]]


def test_bad_clip_values():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_dual"):
        ppo_clip_loss(z, z, z, clip_dual=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        ppo_clip_loss(z, z, z, clip_low=1.0)
