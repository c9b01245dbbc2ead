"""TIS / MIS weights against hand-derived values, and the corrected PAPO loss against the uncorrected one.

The example's per-token log-ratios log(pi_old / mu) are chosen so that every case is worked out by hand:

    row 0 (4 tokens): log rho = [0, 1, -1, ln 3]  -> rho = [1, e, 1/e, 3],   sequence rho = 3
    row 1 (2 tokens + 2 padded): log rho = [ln 1/4, ln 3/2] -> rho = [0.25, 1.5], sequence rho = 0.375
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_papo.algos import LossInputs, LossSpec, papo_loss
from megatron_papo.algos.rollout_correction import ROLLOUT_CORRECTIONS, rollout_correction_weights
from megatron_papo.config import ConfigError, from_dict, load_config
from megatron_papo.config import algo as algo_cfg
from megatron_papo.config.algo import AlgoConfig

D = torch.float64
E = math.e
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
LOG_RHO = torch.tensor([[0.0, 1.0, -1.0, math.log(3)], [math.log(0.25), math.log(1.5), 0.0, 0.0]], dtype=D)


def _weights(method, level="token", cap=2.0, lower=0.0):
    rollout = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.1, float("nan"), -float("inf")]], dtype=D)
    old = rollout + LOG_RHO
    old[1, 2:] = 5.0  # padding: anything, even nan/inf in the engine's row, must not matter
    out = rollout_correction_weights(old, rollout, MASK, method=method, level=level, cap=cap, lower=lower)
    return out.weight_BT, out.corrected_BT


@pytest.mark.parametrize("method,level,cap,lower,weight,corrected", [
    # TIS, token level (Yao et al.): min(rho_t, 2)
    ("tis", "token", 2.0, 0.0, [[1, 2, 1 / E, 2], [0.25, 1.5, 1, 1]], [[0, 1, 0, 1], [0, 0, 0, 0]]),
    # TIS, sequence level: min(prod rho, 2) on every token of the response
    ("tis", "sequence", 2.0, 0.0, [[2, 2, 2, 2], [0.375, 0.375, 1, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]),
    # MIS, token level, one-sided: rho_t kept where rho_t <= 2
    ("mis", "token", 2.0, 0.0, [[1, 0, 1 / E, 0], [0.25, 1.5, 1, 1]], [[0, 1, 0, 1], [0, 0, 0, 0]]),
    # MIS, token level, two-sided [0.5, 2] (IcePop's alpha, beta)
    ("mis", "token", 2.0, 0.5, [[1, 0, 0, 0], [0, 1.5, 1, 1]], [[0, 1, 1, 1], [1, 0, 0, 0]]),
    # Seq-MIS (Liu, Li et al.): the sequence ratio 3 > 2 masks all of row 0; 0.375 is kept
    ("mis", "sequence", 2.0, 0.0, [[0, 0, 0, 0], [0.375, 0.375, 1, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]),
    # Seq-MIS with bounds [0.5, 4]: row 0 (3) kept with weight 3, row 1 (0.375) masked
    ("mis", "sequence", 4.0, 0.5, [[3, 3, 3, 3], [0, 0, 1, 1]], [[0, 0, 0, 0], [1, 1, 0, 0]]),
])
def test_weights_match_hand_derived_values(method, level, cap, lower, weight, corrected):
    w, c = _weights(method, level, cap, lower)
    torch.testing.assert_close(w, torch.tensor(weight, dtype=D), rtol=1e-12, atol=1e-12)
    assert c.tolist() == [[float(v) for v in row] for row in corrected]


def test_no_overflow_for_huge_ratios():
    old, rollout = torch.tensor([[0.0, 0.0]]), torch.tensor([[-500.0, -0.1]])
    for method in ("tis", "mis"):
        for level in ("token", "sequence"):
            w = rollout_correction_weights(old, rollout, torch.ones(1, 2), method=method, level=level).weight_BT
            assert torch.isfinite(w).all(), (method, level, w)


def test_bad_arguments_fail():
    x = torch.zeros(1, 2)
    with pytest.raises(KeyError, match="unknown rollout correction 'clip'; known: mis, tis"):
        rollout_correction_weights(x, x, torch.ones(1, 2), method="clip")
    with pytest.raises(KeyError, match="level 'tokens'"):
        rollout_correction_weights(x, x, torch.ones(1, 2), method="tis", level="tokens")
    with pytest.raises(ValueError, match="cap must be >= 1"):
        rollout_correction_weights(x, x, torch.ones(1, 2), method="tis", cap=0.9)


# ---------------------------------------------------------------- inside the PAPO loss

def _inputs(rollout_logprob=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 6
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    logprob = (old + 0.3 * torch.randn(B, T, generator=g, dtype=D)).requires_grad_(True)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return LossInputs(logprob=logprob, old_logprob=old, advantages=torch.tensor([1.0, -0.7, 0.4], dtype=D),
                      response_mask=mask, ref_logprob=old - 0.2, aug_logprob=old - 0.5 * torch.rand(B, T, generator=g, dtype=D),
                      rollout_logprob=rollout_logprob)


SPEC = LossSpec(kl_coef=0.01, use_kl_prcp=True, kl_prcp_coef=0.02, ori_entropy_coef=0.03, aug_entropy_coef=0.01)


@pytest.mark.parametrize("method", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_engine_equal_to_trainer_gives_the_uncorrected_loss_bitwise(method, level, agg):
    base = _inputs()
    loss0, m0 = papo_loss(base, SPEC.replace(agg_mode=agg), global_tokens=None, global_seqs=None, num_microbatches=1)
    loss0.backward()
    grad0 = base.logprob.grad.clone()
    same = _inputs(rollout_logprob=base.old_logprob.clone())
    spec = SPEC.replace(agg_mode=agg, rollout_correction=method, rollout_correction_level=level,
                        rollout_correction_lower=0.5 if method == "mis" else 0.0)
    loss1, m1 = papo_loss(same, spec, global_tokens=None, global_seqs=None, num_microbatches=1)
    loss1.backward()
    assert torch.equal(loss1, loss0) and torch.equal(same.logprob.grad, grad0)
    assert all(torch.equal(m1[k], m0[k]) for k in m0)
    assert float(m1["rollout_corr/weight_mean"]) == 1.0 and float(m1["rollout_corr/corrected_frac"]) == 0.0


def test_weights_scale_only_the_policy_gradient_term_by_hand():
    """One row, logprob == old (ratio 1, inside the clip), A = 1: L_pg,t = -w_t, and its gradient is -w_t / T.
    Engine log-probs give rho = [4, 0.5, 1] -> TIS(C=2) weights [2, 0.5, 1]: token mean -(2 + 0.5 + 1) / 3."""
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=D)
    rollout = old - torch.log(torch.tensor([[4.0, 0.5, 1.0]], dtype=D))

    def run(spec, rollout_logprob):
        lp = old.clone().requires_grad_(True)
        x = LossInputs(logprob=lp, old_logprob=old, advantages=torch.tensor([1.0], dtype=D), response_mask=torch.ones(1, 3),
                       ref_logprob=old - 0.1, aug_logprob=old - 0.3, rollout_logprob=rollout_logprob)
        loss, m = papo_loss(x, spec, global_tokens=None, global_seqs=None, num_microbatches=1)
        loss.backward()
        return loss, m, lp.grad

    spec = LossSpec(kl_coef=0.01, use_kl_prcp=True, kl_prcp_coef=0.02)
    _, m0, _ = run(spec, None)
    _, m1, grad = run(spec.replace(rollout_correction="tis"), rollout)
    assert float(m1["loss/pg"]) == pytest.approx(-3.5 / 3, rel=1e-12)
    assert float(m1["rollout_corr/weight_mean"]) == pytest.approx(3.5 / 3, rel=1e-12)
    assert float(m1["rollout_corr/corrected_frac"]) == pytest.approx(1 / 3, rel=1e-12)
    for k in ("loss/kl_ref", "loss/kl_prcp", "kl/prcp", "kl/ref"):  # reference and perception KL are not weighted
        assert torch.equal(m1[k], m0[k]), k
    # gradient of the PG part is -w_t / 3; the KL terms add the same amount in both runs
    _, _, grad0 = run(spec, None)
    torch.testing.assert_close(grad - grad0, torch.tensor([[-2.0, -0.5, -1.0]], dtype=D) / 3 + 1.0 / 3,
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs rollout_logprob"):
        run(spec.replace(rollout_correction="mis"), None)


# ---------------------------------------------------------------- config

def test_config_names_match_registry_and_bad_values_fail():
    assert list(algo_cfg.ROLLOUT_CORRECTIONS) == ROLLOUT_CORRECTIONS.names()
    for data, match in [({"rollout_correction": "is"}, r"algo.rollout_correction: got 'is', expected one of none, mis, tis"),
                        ({"rollout_correction_cap": 0.5}, r"algo.rollout_correction_cap: got 0.5, expected >= 1"),
                        ({"rollout_correction": "mis", "rollout_correction_lower": 1.5}, r"algo.rollout_correction_lower"),
                        ({"rollout_correction": "tis", "rollout_correction_lower": 0.5}, r"is a bound of rollout_correction=mis")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(AlgoConfig, data)
    spec = LossSpec.from_config(load_config(None, ["algo.rollout_correction=mis", "algo.rollout_correction_level=sequence",
                                                   "algo.rollout_correction_cap=5", "algo.rollout_correction_lower=0.5"]).algo, 0, 10)
    assert (spec.rollout_correction, spec.rollout_correction_level, spec.rollout_correction_cap,
            spec.rollout_correction_lower) == ("mis", "sequence", 5.0, 0.5)
