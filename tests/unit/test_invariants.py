"""First-step invariants: dtype-based tolerances, and the PPO-ratio check only where the ratio must be 1."""

from __future__ import annotations

import pytest
import torch

from megatron_papo.invariants import InvariantChecker, InvariantError, invariant_tolerances


def test_tolerances_follow_the_dtype():
    assert invariant_tolerances(torch.float32) == (1e-5, 1e-5)  # 16 * 1.2e-7 is below the floor
    gap, mean = invariant_tolerances(torch.bfloat16)
    assert gap == 16 * 2 ** -7 and mean == 2 ** -7  # bf16 keeps 8 significant bits
    assert invariant_tolerances(torch.bfloat16, fp8=True) == (16 * 2 ** -3, 2 ** -3)  # e4m3 GEMM inputs
    assert invariant_tolerances(torch.bfloat16, override=1e-3) == (1e-3, 1e-3)


def test_bf16_rounding_of_logits_passes_and_a_real_difference_fails():
    """Two bf16 evaluations of the same logits through different reduction orders stay inside the bf16 bound;
    a policy that really differs (another temperature) does not."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 512, generator=g, dtype=torch.float64) * 4
    tok = torch.randint(0, 512, (64,), generator=g)
    exact = torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1)
    zb = z.to(torch.bfloat16)
    lp_a = torch.log_softmax(zb.float(), -1).gather(-1, tok[:, None]).squeeze(-1).double()
    lp_b = (zb.gather(-1, tok[:, None]).squeeze(-1).float() - torch.logsumexp(zb, -1).float()).double()  # bf16 lse
    chk = InvariantChecker.for_dtype(True, torch.bfloat16)
    chk.actor_ref(1, float((lp_a - exact).abs().max()))
    chk.actor_ref(1, float((lp_b - exact).abs().max()))
    chk.ppo_ratio(1, 0, 0, float((lp_b - lp_a).mean()))
    other = torch.log_softmax(z / 1.3, -1).gather(-1, tok[:, None]).squeeze(-1)
    with pytest.raises(InvariantError, match="actor and reference"):
        chk.actor_ref(1, float((other - exact).abs().max()))


def test_ppo_ratio_checked_only_on_the_first_mini_batch_of_the_first_epoch():
    chk = InvariantChecker.for_dtype(True, torch.float32)
    chk.ppo_ratio(3, 0, 0, 5e-6)
    chk.ppo_ratio(3, 1, 0, 0.2)  # second epoch: the weights moved, the ratio differs by design
    chk.ppo_ratio(3, 0, 1, 0.2)  # second mini-batch: after an optimizer step
    with pytest.raises(InvariantError, match="step 3: PPO ratio"):
        chk.ppo_ratio(3, 0, 0, 1e-3)
    chk.ppo_ratio(3, 0, 0, float("nan"))  # a diverged forward: the non-finite guard skips the step, the run goes on


def test_actor_ref_only_at_step_1_and_disabled_checker_is_silent():
    chk = InvariantChecker.for_dtype(True, torch.float32)
    chk.actor_ref(2, 1.0)
    with pytest.raises(InvariantError):
        chk.actor_ref(1, 1e-3)
    off = InvariantChecker.for_dtype(False, torch.float32)
    off.actor_ref(1, 1.0)
    off.ppo_ratio(1, 0, 0, 1.0)
