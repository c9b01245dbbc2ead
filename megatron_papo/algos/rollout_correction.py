"""Rollout-training mismatch correction: a constant weight per token of the policy-gradient term (TIS, MIS).

The engine samples each response token ``y_t`` from its own distribution ``mu`` (its kernels and precision; with
``rollout.async_steps=1`` also weights one update older), while the PPO ratio is taken against ``pi_old``, the
trainer's log-prob at the weights the update starts from (``old_logprob``). With the per-token ratio

    rho_t = pi_old(y_t) / mu(y_t) = exp(old_logprob_t - rollout_logprob_t)

and the sequence ratio ``rho(y) = prod_t rho_t`` (over the response tokens), each method gives a weight ``w``:

* ``tis`` -- truncated importance sampling, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
  Off-Policy RL Training" (https://fengyao.notion.site/off-policy-rl): ``w_t = min(rho_t, C)`` (token level, the
  blog's definition); sequence level ``w = min(rho(y), C)`` on every token of ``y`` (verl's ``seq_is``,
  docs/algo/rollout_corr_math.md §3.3.2).
* ``mis`` -- masked importance sampling: ``w_t = rho_t * 1[lower <= rho_t <= C]`` (token level: IcePop's
  ``M(k; alpha, beta) = k if k in [alpha, beta] else 0``, Ling Team 2025, "Every Step Evolves: Scaling
  Reinforcement Learning for Trillion-Scale Thinking Model", arXiv:2510.18855, with alpha = lower, beta = C);
  sequence level ``w = rho(y) * 1[lower <= rho(y) <= C]`` (Seq-MIS of Liu, Li et al. 2025, "When Speed Kills
  Stability: Demystifying RL Collapse from the Training-Inference Mismatch", https://richardli.xyz/rl-collapse;
  verl's ``seq_mis`` preset = sequence IS weight + sequence rejection with ``lower = 0``).

The weight multiplies each token's clipped-surrogate loss (after the eps- and dual-clip), as in Yao et al.'s and
verl's decoupled-PPO form ``w_t * L_pg,t``. Masked tokens stay in the loss's normaliser: the published estimators
are expectations over every sampled token / sequence in which a masked one contributes zero (IcePop's
``1/sum|y| sum_t M(.)``); verl (PR #3915) and slime (PR #657) later chose to drop rejected tokens from the
denominator instead -- a documented difference. The reference KL, PAPO's perception KL and the entropy terms are
not weighted: the trainer computes them on its own views. With ``rollout_logprob == old_logprob`` every ratio is
``exp(0) = 1`` exactly, so ``w = 1`` and the corrected loss equals the uncorrected one bit for bit (needs
``lower <= 1 <= C``, which the config enforces).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_papo.algos.registry import Registry

LEVELS = ("token", "sequence")


@dataclass
class CorrectionOut:
    """Per-token ``[B, T]`` outputs (constants): the weight and whether the token was truncated / masked."""

    weight_BT: torch.Tensor
    corrected_BT: torch.Tensor


ROLLOUT_CORRECTIONS: Registry[Callable[..., CorrectionOut]] = Registry("rollout correction")


def _log_ratio(old_logprob_BT: torch.Tensor, rollout_logprob_BT: torch.Tensor, mask_BT: torch.Tensor,
               level: str) -> torch.Tensor:
    """log rho per token (0 on padding), or the sequence's summed log rho broadcast over its tokens. Not clamped:
    the methods below decide in log space and never exponentiate above log(cap), so nothing overflows."""
    if level not in LEVELS:
        raise KeyError(f"unknown rollout correction level '{level}'; known: {', '.join(LEVELS)}")
    keep = mask_BT > 0
    lr = torch.where(keep, old_logprob_BT.detach() - rollout_logprob_BT.detach(), torch.zeros_like(old_logprob_BT))
    if level == "sequence":
        lr = lr.sum(-1, keepdim=True).expand_as(lr)
    return lr


@ROLLOUT_CORRECTIONS.register("tis")
def truncated_is(log_ratio_BT: torch.Tensor, *, cap: float, lower: float = 0.0) -> CorrectionOut:
    """``w = min(rho, cap)`` (computed as ``exp(min(log rho, log cap))``: no overflow); corrected = truncated."""
    log_cap = math.log(cap)
    w = torch.exp(torch.clamp(log_ratio_BT, max=log_cap))
    return CorrectionOut(w, (log_ratio_BT > log_cap).to(w.dtype))


@ROLLOUT_CORRECTIONS.register("mis")
def masked_is(log_ratio_BT: torch.Tensor, *, cap: float, lower: float = 0.0) -> CorrectionOut:
    """``w = rho * 1[lower <= rho <= cap]`` (decided in log space); corrected = masked."""
    log_cap = math.log(cap)
    keep = log_ratio_BT <= log_cap
    if lower > 0:
        keep = keep & (log_ratio_BT >= math.log(lower))
    rho = torch.exp(torch.clamp(log_ratio_BT, max=log_cap))  # exact where kept; the rest is masked
    return CorrectionOut(torch.where(keep, rho, torch.zeros_like(rho)), (~keep).to(rho.dtype))


def rollout_correction_weights(old_logprob_BT: torch.Tensor, rollout_logprob_BT: torch.Tensor, mask_BT: torch.Tensor, *,
                               method: str, level: str = "token", cap: float = 2.0, lower: float = 0.0) -> CorrectionOut:
    """Weights of ``method`` (``tis`` | ``mis``) at ``level`` (``token`` | ``sequence``); see the module docstring.

    ``old_logprob_BT`` is the trainer's log-prob at the weights the update starts from, ``rollout_logprob_BT``
    the engine's log-prob of the same sampled token, ``mask_BT`` the response mask; both are treated as constants.
    Padding gets weight 1 and is never counted as corrected.
    """
    if not cap >= 1.0:
        raise ValueError(f"rollout correction cap must be >= 1 (a ratio of 1 is on-policy), got {cap}")
    if not 0.0 <= lower <= 1.0:
        raise ValueError(f"rollout correction lower bound must be in [0, 1], got {lower}")
    fn = ROLLOUT_CORRECTIONS.get(method)
    lr = _log_ratio(old_logprob_BT, rollout_logprob_BT, mask_BT, level)
    out = fn(lr, cap=cap, lower=lower)
    keep = mask_BT > 0
    return CorrectionOut(torch.where(keep, out.weight_BT, torch.ones_like(out.weight_BT)),
                         torch.where(keep, out.corrected_BT, torch.zeros_like(out.corrected_BT)))
