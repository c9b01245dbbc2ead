"""The composed PAPO loss against an independent float64 re-derivation from papo_spec.md §2.

The reference below is written from the spec's formulas with plain per-token loops (torch
0-d float64 tensors so that autograd gives its gradient too); it shares no code with
``megatron_papo.algos``.
"""

import math

import pytest
import torch

from megatron_papo.algos import LossInputs, LossSpec, count_normalisers, papo_loss
from megatron_papo.config.algo import AlgoConfig

D = torch.float64


def _ref_tok(x):
    return torch.tensor(x, dtype=D)


def spec_reference(lc, l_old, l_ref, l_aug, adv, mask, *, eps_low, eps_high, c_dual, beta, gamma, eta1, eta2,
                   mode="token"):
    """papo_spec §2.8 in loops: TM(Lpg) + beta TM(KLref) - gamma TM(KLprcp) + eta2 TM(-l_aug) + eta1 TM(-l)."""
    B, T = len(mask), len(mask[0])
    terms = {k: [[None] * T for _ in range(B)] for k in ("pg", "ref", "prcp", "haug", "hori")}
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            a = adv[i]
            d = torch.clamp(lc[i][t] - l_old[i][t], -20.0, 20.0)                            # §2.3
            r = torch.exp(d)
            rclip = torch.exp(torch.clamp(d, math.log(1 - eps_low), math.log(1 + eps_high)))
            L1, L2, L3 = -a * r, -a * rclip, _ref_tok(-a * c_dual)
            lpg = torch.maximum(L1, L2) if a >= 0 else torch.minimum(torch.maximum(L1, L2), L3)
            x = torch.clamp(l_ref[i][t] - lc[i][t], -20.0, 20.0)                             # §2.4
            kref = torch.clamp(torch.exp(x) - x - 1, -10.0, 10.0)
            y = torch.clamp(l_aug[i][t] - lc[i][t], -20.0, 20.0)                             # §2.5 / §3
            kprcp = torch.clamp(torch.exp(y) - y - 1, -10.0, 10.0)
            terms["pg"][i][t], terms["ref"][i][t], terms["prcp"][i][t] = lpg, kref, kprcp
            terms["haug"][i][t], terms["hori"][i][t] = -l_aug[i][t], -lc[i][t]             # §2.6

    def avg(name):
        if mode == "token":   # masked token mean over the (micro-)batch
            vals = [v for row in terms[name] for v in row if v is not None]
            return sum(vals) / len(vals)
        means = [sum(v for v in row if v is not None) / sum(1 for v in row if v is not None) for row in terms[name]]
        return sum(means) / len(means)   # "seq": mean of per-sequence token means

    return avg("pg") + beta * avg("ref") - gamma * avg("prcp") + eta2 * avg("haug") + eta1 * avg("hori")


def _example():
    """B=3, T=4 with padding; tokens chosen to hit: eps-clip both sides, dual-clip, KL caps."""
    lc = [[-0.5, -1.2, -3.0, -4.0], [-0.3, -0.9, -0.2, -0.2], [-2.5, -0.05, -0.7, -1.0]]
    l_old = [[-0.9, -1.0, -3.0, -4.1], [-0.2, -1.3, -1.5, -0.2], [-2.0, -0.6, -0.6, 0.0]]
    l_ref = [[-0.6, -4.5, -0.2, -0.5], [-0.3, -0.5, -1.0, -0.4], [-2.0, -0.1, -3.9, 0.0]]
    l_aug = [[-1.5, -1.1, -0.1, -2.0], [-0.4, -2.9, -0.3, -9.0], [-2.6, -0.5, -0.2, 0.0]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]
    adv = [1.0, -1.0, -0.5]
    return lc, l_old, l_ref, l_aug, adv, mask


COEFS = dict(eps_low=0.2, eps_high=0.3, c_dual=3.0, beta=0.01, gamma=0.02, eta1=0.05, eta2=0.05)
SPEC = LossSpec(clip_low=0.2, clip_high=0.3, clip_dual=3.0, agg_mode="microbatch_token_mean", kl_coef=0.01,
                kl_estimator="k3", use_kl_prcp=True, kl_prcp_coef=0.02, ori_entropy_coef=0.05, aug_entropy_coef=0.05)


def _run_both(spec, mode, aug_live=False, **norm):
    lc, l_old, l_ref, l_aug, adv, mask = _example()
    lp = torch.tensor(lc, dtype=D, requires_grad=True)
    aug = torch.tensor(l_aug, dtype=D, requires_grad=aug_live)
    inputs = LossInputs(logprob=lp, old_logprob=torch.tensor(l_old, dtype=D), advantages=torch.tensor(adv, dtype=D),
                        response_mask=torch.tensor(mask), ref_logprob=torch.tensor(l_ref, dtype=D), aug_logprob=aug)
    loss, metrics = papo_loss(inputs, spec, **{"global_tokens": None, "global_seqs": None, "num_microbatches": 1, **norm})
    loss.backward()
    lp_ref = [[_ref_tok(v).requires_grad_(True) for v in row] for row in lc]
    aug_ref = [[_ref_tok(v).requires_grad_(aug_live) for v in row] for row in l_aug]
    ref_loss = spec_reference(lp_ref, l_old, l_ref, aug_ref, adv, mask, mode=mode, **COEFS)
    ref_loss.backward()
    grad_ref = torch.tensor([[v.grad.item() if v.grad is not None else 0.0 for v in row] for row in lp_ref], dtype=D)
    aug_grad_ref = torch.tensor([[v.grad.item() if v.grad is not None else 0.0 for v in row] for row in aug_ref], dtype=D)
    return loss, metrics, lp.grad, aug.grad, ref_loss, grad_ref, aug_grad_ref


def test_example_hits_the_interesting_regions():
    lc, l_old, l_ref, l_aug, adv, mask = _example()
    assert l_aug[0][2] - lc[0][2] > 2.6                            # KL_prcp cap (k3 > 10)
    assert l_ref[0][3] - lc[0][3] > 2.6                            # KL_ref cap
    assert math.exp(lc[1][2] - l_old[1][2]) > 3.0 and adv[1] < 0   # dual clip active
    assert math.exp(lc[0][0] - l_old[0][0]) > 1.3 and adv[0] > 0   # eps_high clip
    assert math.exp(lc[2][0] - l_old[2][0]) < 0.8 and adv[2] < 0   # eps_low clip (A < 0)
    assert math.exp(lc[2][1] - l_old[2][1]) > 1.3 and adv[2] < 0   # A<0, ratio high, below dual cap (1.73*0.5 < 1.5)


@pytest.mark.parametrize("agg_mode,mode", [("microbatch_token_mean", "token"), ("token_mean", "token"),
                                           ("seq_mean_token_mean", "seq")])
def test_total_loss_and_grad_match_independent_float64(agg_mode, mode):
    loss, metrics, grad, aug_grad, ref_loss, grad_ref, _ = _run_both(SPEC.replace(agg_mode=agg_mode), mode)
    assert loss.dtype == D
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)
    assert aug_grad is None                                   # detached: the masked view gets no gradient
    assert grad[1, 3] == 0 and grad[2, 3] == 0                # padding: zero gradient
    assert metrics["loss/total"].item() == pytest.approx(loss.item(), rel=1e-15)


def test_live_mode_masked_branch_gets_gradient():
    spec = SPEC.replace(aug_mode="live")
    loss, _, grad, aug_grad, ref_loss, grad_ref, aug_grad_ref = _run_both(spec, "token", aug_live=True)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(aug_grad, aug_grad_ref, rtol=1e-12, atol=1e-14)
    assert aug_grad.abs().sum() > 0


def test_detached_mode_detaches_live_aug_input():
    lc, l_old, _, l_aug, adv, mask = _example()
    aug = torch.tensor(l_aug, dtype=D, requires_grad=True)
    lp = torch.tensor(lc, dtype=D, requires_grad=True)
    x = LossInputs(lp, torch.tensor(l_old, dtype=D), torch.tensor(adv, dtype=D), torch.tensor(mask), aug_logprob=aug)
    loss, _ = papo_loss(x, SPEC.replace(kl_coef=0.0), global_tokens=None, global_seqs=None, num_microbatches=1)
    loss.backward()
    assert aug.grad is None


def test_metrics_signs_and_values():
    loss, m, *_ = _run_both(SPEC, "token")
    lc, l_old, l_ref, l_aug, adv, mask = _example()
    toks = [(i, t) for i in range(3) for t in range(4) if mask[i][t]]
    assert m["loss/kl_prcp"].item() == pytest.approx(-m["kl/prcp"].item(), rel=1e-15)   # reference logs -KL_prcp
    assert m["kl/prcp"].item() > 0
    k3 = lambda a, b: min(math.exp(max(min(b - a, 20), -20)) - max(min(b - a, 20), -20) - 1, 10)
    assert m["kl/ref"].item() == pytest.approx(sum(k3(lc[i][t], l_ref[i][t]) for i, t in toks) / len(toks), rel=1e-12)
    assert m["entropy/ori"].item() == pytest.approx(sum(-lc[i][t] for i, t in toks) / len(toks), rel=1e-12)
    assert m["entropy/aug"].item() == pytest.approx(sum(-l_aug[i][t] for i, t in toks) / len(toks), rel=1e-12)
    assert m["ppo_kl"].item() == pytest.approx(sum(l_old[i][t] - lc[i][t] for i, t in toks) / len(toks), rel=1e-12)
    # clip_high: (0,0) r=1.49 A>0 yes; (2,0) r=0.61 A<0 yes; the rest are inside [0.8, 1.3] or on the unclipped
    # side ((1,1) r=1.49 A<0, (2,1) r=1.73 A<0). clip_low (dual): (1,2) r=3.67 A=-1 -> 3.67 > 3.
    assert m["clipfrac/high"].item() == pytest.approx(2 / 10)
    assert m["clipfrac/low"].item() == pytest.approx(1 / 10)
    assert set(m) == {"loss/pg", "loss/kl_ref", "loss/kl_prcp", "loss/ori_entropy", "loss/aug_entropy", "loss/total",
                      "kl/ref", "kl/prcp", "entropy/ori", "entropy/aug", "clipfrac/high", "clipfrac/low", "ppo_kl"}


def test_microbatch_sums_equal_whole_batch_for_loss_and_metrics():
    lc, l_old, l_ref, l_aug, adv, mask = _example()
    t = lambda v: torch.tensor(v, dtype=D)
    full = LossInputs(t(lc), t(l_old), t(adv), torch.tensor(mask), ref_logprob=t(l_ref), aug_logprob=t(l_aug))
    spec = SPEC.replace(agg_mode="token_mean")
    whole, m_whole = papo_loss(full, spec, global_tokens=None, global_seqs=None, num_microbatches=1)
    parts = [slice(0, 1), slice(1, 3)]
    tokens = sum(count_normalisers(full.response_mask[p])[0] for p in parts)
    seqs = sum(count_normalisers(full.response_mask[p])[1] for p in parts)
    total, sums = 0.0, {}
    for p in parts:
        x = LossInputs(full.logprob[p], full.old_logprob[p], full.advantages[p], full.response_mask[p],
                       ref_logprob=full.ref_logprob[p], aug_logprob=full.aug_logprob[p])
        loss, m = papo_loss(x, spec, global_tokens=tokens, global_seqs=seqs, num_microbatches=2)
        total = total + loss
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    assert total.item() == pytest.approx(whole.item(), rel=1e-12)
    for k, v in m_whole.items():
        assert sums[k].item() == pytest.approx(v.item(), rel=1e-12, abs=1e-15), k


def test_exact_estimators_and_missing_inputs():
    lp = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    ent = torch.tensor([[0.7, 1.3]], dtype=D, requires_grad=True)
    kl_exact = torch.tensor([[0.2, 0.4]], dtype=D, requires_grad=True)
    x = LossInputs(lp, lp.detach(), torch.tensor([0.0], dtype=D), torch.ones(1, 2), entropy=ent, kl_exact=kl_exact)
    spec = LossSpec(use_kl_prcp=True, kl_prcp_coef=0.1, kl_prcp_estimator="exact", entropy_estimator="exact",
                    ori_entropy_coef=0.5)
    loss, m = papo_loss(x, spec, global_tokens=None, global_seqs=None, num_microbatches=1)
    # A = 0 -> pg = 0; loss = -0.1 * mean(0.2, 0.4) + 0.5 * mean(0.7, 1.3)
    assert loss.item() == pytest.approx(-0.1 * 0.3 + 0.5 * 1.0, rel=1e-14)
    loss.backward()
    assert ent.grad.tolist() == [[0.25, 0.25]] and kl_exact.grad.tolist() == [[-0.05, -0.05]]
    assert m["entropy/ori"].item() == pytest.approx(1.0) and "entropy/aug" not in m
    with pytest.raises(ValueError, match="needs ref_logprob"):
        papo_loss(x, spec.replace(kl_coef=0.01), global_tokens=None, global_seqs=None, num_microbatches=1)
    with pytest.raises(ValueError, match="needs aug_entropy"):
        papo_loss(x, spec.replace(aug_entropy_coef=0.1), global_tokens=None, global_seqs=None, num_microbatches=1)
    with pytest.raises(ValueError, match="needs aug_logprob"):
        papo_loss(x, spec.replace(kl_prcp_estimator="k3_sampled"), global_tokens=None, global_seqs=None, num_microbatches=1)


def test_plain_grpo_without_masked_view():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    x = LossInputs(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2))
    loss, m = papo_loss(x, LossSpec(), global_tokens=None, global_seqs=None, num_microbatches=1)
    assert loss.item() == pytest.approx(-1.0) and "kl/prcp" not in m and "kl/ref" not in m
    assert m["entropy/ori"].item() == pytest.approx(1.5)


def test_spec_from_config_constant_and_annealing():
    cfg = AlgoConfig()
    s = LossSpec.from_config(cfg, step=3, total_steps=10)
    assert (s.clip_low, s.clip_high, s.clip_dual, s.kl_coef, s.kl_prcp_coef) == (0.2, 0.3, 3.0, 0.01, 0.02)
    assert s.use_kl_prcp and s.entropy_discount == 1.0 and s.agg_mode == "token_mean"
    cfg = AlgoConfig(use_ref=False, kl_prcp_schedule="annealing", ori_entropy_coef=0.05)
    s = LossSpec.from_config(cfg, step=25, total_steps=100)   # 0.02 -> 0 over 50 steps
    assert s.kl_coef == 0.0 and s.kl_prcp_coef == pytest.approx(0.01) and s.entropy_discount == pytest.approx(0.5)
    s = LossSpec.from_config(cfg, step=60, total_steps=100)
    assert s.kl_prcp_coef == 0.0 and s.use_kl_prcp and s.entropy_discount == 0.0
    s = LossSpec.from_config(AlgoConfig(kl_prcp_coef=0.0, log_ratio_clamp=0.0), step=0, total_steps=1)
    assert not s.use_kl_prcp and s.kl_prcp_coef == 0.0 and s.log_ratio_clamp is None


def test_spec_rejects_unknown_names():
    with pytest.raises(KeyError, match="known: sampled, exact"):
        LossSpec(entropy_estimator="analytic")
    with pytest.raises(KeyError, match="unknown loss aggregation mode 'seq'"):
        LossSpec(agg_mode="seq")
    with pytest.raises(ValueError, match="kl_prcp_top_p"):
        LossSpec(kl_prcp_top_p=1.0)


def test_garbage_at_padded_positions_is_harmless():
    def build(pad_value):
        lc, l_old, l_ref, l_aug, adv, mask = _example()
        rows = [[list(r) for r in arr] for arr in (lc, l_old, l_ref, l_aug)]
        for arr in rows:
            arr[1][3], arr[2][3] = pad_value, float("-inf")
        lp = torch.tensor(rows[0], dtype=D, requires_grad=True)
        x = LossInputs(lp, torch.tensor(rows[1], dtype=D), torch.tensor(adv, dtype=D), torch.tensor(mask),
                       ref_logprob=torch.tensor(rows[2], dtype=D), aug_logprob=torch.tensor(rows[3], dtype=D))
        loss, _ = papo_loss(x, SPEC, global_tokens=None, global_seqs=None, num_microbatches=1)
        loss.backward()
        return loss, lp.grad

    clean_loss, clean_grad = build(0.0)
    loss, grad = build(float("nan"))
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)


def test_bf16_inputs_are_computed_in_fp32():
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    x = LossInputs(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2))
    loss, _ = papo_loss(x, LossSpec(), global_tokens=None, global_seqs=None, num_microbatches=1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """Device handling (not run on CPU CI): the same example on CUDA gives the CPU loss and gradient."""
    from megatron_papo.algos import compute_advantages

    def run(device):
        lc, l_old, l_ref, l_aug, adv, mask = _example()
        t = lambda v: torch.tensor(v, dtype=D, device=device)
        lp = t(lc).requires_grad_(True)
        x = LossInputs(lp, t(l_old), t(adv), torch.tensor(mask, device=device), ref_logprob=t(l_ref), aug_logprob=t(l_aug))
        loss, m = papo_loss(x, SPEC.replace(kl_prcp_top_p=0.5, kl_prcp_clip=0.2), global_tokens=10, global_seqs=3,
                            num_microbatches=1)
        loss.backward()
        a = compute_advantages("grpo", t([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1], device=device))
        return loss.item(), lp.grad.cpu(), {k: v.item() for k, v in m.items()}, a.cpu()

    cpu, gpu = run("cpu"), run("cuda")
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-12) and gpu[2] == pytest.approx(cpu[2], rel=1e-12)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gpu[3], cpu[3])
