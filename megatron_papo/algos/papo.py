"""PAPO's perception terms: KL_prcp per token, its optional mask/clip, and the gamma schedule.

KL_prcp (papo_spec §2.5, §3) estimates KL(pi_theta(.|q, I) || pi(.|q, I_mask)) per response token:

- ``k3_sampled`` (published): ``y = clamp(l_aug - l, +-20)``, ``k3 = clamp(exp(y) - y - 1, max 10)``,
  i.e. the k3 estimator with ratio pi_mask / pi_theta on the sampled tokens (:func:`kl_estimate`).
- ``exact``: the full-vocabulary KL per token computed by the vocab-parallel kernel
  (``token_stats``), in the same direction (original first, masked second), clamped to
  ``[-value_clamp, value_clamp]`` like k3 so both estimators share the same safety cap.

Then, in the reference code's order: per-sequence top-p token mask (§2.9, keep tokens whose
value is >= the per-sequence ``1 - top_p`` quantile of the valid tokens, linear interpolation
as ``torch.nanquantile``), then the optional clip to ``[0, c]``. The loss adds ``-gamma * agg(KL_prcp)``
(KL_prcp is maximised).

gamma schedule (reference ``AnnealingKLController``): ``constant`` -> gamma = kl_prcp_coef;
``annealing`` -> linear from ``start`` to ``end`` over ``max(1, int(total_steps * ratio))`` steps,
``step`` counted from 0 (step 0 uses ``start``), constant ``end`` afterwards. The entropy
coefficients are scaled by ``discount = gamma(step) / kl_prcp_coef`` (1.0 when constant).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_papo.algos.kl import kl_estimate

KL_PRCP_ESTIMATORS = ("k3_sampled", "exact")
GAMMA_SCHEDULES = ("constant", "annealing")


def kl_prcp_per_token(logprob_BT: torch.Tensor, *, estimator: str = "k3_sampled", aug_logprob_BT: Optional[torch.Tensor] = None,
                      kl_exact_BT: Optional[torch.Tensor] = None, log_ratio_clamp: Optional[float] = 20.0,
                      value_clamp: Optional[float] = 10.0) -> torch.Tensor:
    """Per-token KL_prcp ``[B, T]`` (before top-p mask and clip); see module docstring."""
    if estimator == "k3_sampled":
        if aug_logprob_BT is None:
            raise ValueError("kl_prcp_estimator=k3_sampled needs aug_logprob (masked-view log-probs)")
        return kl_estimate("k3", logprob_BT, aug_logprob_BT, log_ratio_clamp=log_ratio_clamp, value_clamp=value_clamp)
    if estimator == "exact":
        if kl_exact_BT is None:
            raise ValueError("kl_prcp_estimator=exact needs kl_exact (per-token full-vocab KL from token_stats)")
        kl = kl_exact_BT if kl_exact_BT.dtype == torch.float64 else kl_exact_BT.float()
        return kl if value_clamp is None else kl.clamp(-value_clamp, value_clamp)
    raise KeyError(f"unknown KL_prcp estimator '{estimator}'; known: {', '.join(KL_PRCP_ESTIMATORS)}")


def top_p_token_mask(values_BT: torch.Tensor, mask_BT: torch.Tensor, top_p: float) -> torch.Tensor:
    """0/1 mask keeping, per sequence, valid tokens with value >= the ``1 - top_p`` quantile of its valid tokens."""
    if not 0.0 < top_p < 1.0:
        raise ValueError(f"kl_prcp top_p must be in (0, 1), got {top_p}")
    v = values_BT.detach()
    valid = mask_BT > 0
    thresh = torch.nanquantile(v.masked_fill(~valid, float("nan")), 1.0 - top_p, dim=-1, keepdim=True)
    return ((v >= thresh) & valid).to(values_BT.dtype)


def shape_kl_prcp(kl_BT: torch.Tensor, mask_BT: torch.Tensor, *, top_p: float = 0.0, clip: float = 0.0) -> torch.Tensor:
    """Apply the optional top-p token mask (``top_p > 0``) then the clip to ``[0, clip]`` (``clip > 0``)."""
    if top_p > 0.0:
        kl_BT = kl_BT * top_p_token_mask(kl_BT, mask_BT, top_p)
    if clip > 0.0:
        kl_BT = kl_BT.clamp(0.0, clip)
    return kl_BT


def kl_prcp_gamma(step: int, total_steps: int, *, schedule: str = "constant", coef: float = 0.02,
                  start: Optional[float] = None, end: float = 0.0, ratio: float = 0.5) -> float:
    """gamma at training ``step`` (0-based): ``coef`` (constant) or the linear annealing value."""
    if schedule == "constant":
        return float(coef)
    if schedule == "annealing":
        start = coef if start is None else start
        anneal_steps = max(1, int(total_steps * ratio))
        progress = min(max(step, 0) / anneal_steps, 1.0)
        return float(start + (end - start) * progress)
    raise KeyError(f"unknown kl_prcp schedule '{schedule}'; known: {', '.join(GAMMA_SCHEDULES)}")


def entropy_discount(gamma: float, coef: float) -> float:
    """Scale of the entropy coefficients under annealing: gamma / coef (1.0 if equal or coef == 0)."""
    if coef == 0.0 or gamma == coef:
        return 1.0
    return gamma / coef
