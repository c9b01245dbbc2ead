"""The one function composing PAPO / GRPO / DAPO's loss from per-token tensors (papo_spec §2.8).

    loss = agg(w * L_pg) + beta * agg(KL_ref) - gamma * agg(KL_prcp)
           + eta2 * discount * agg(H_aug) + eta1 * discount * agg(H_ori)

``w`` is the rollout-mismatch correction (:mod:`rollout_correction`: TIS / MIS from the trainer's ``old_logprob``
and the engine's ``rollout_logprob``; 1 when ``rollout_correction="none"``); it weights the policy-gradient term
only.

``agg`` is the configured aggregation mode (:mod:`aggregate`), applied to every term. The
reference code uses a plain micro-batch token mean for the two entropy terms whatever the mode;
with the reference mode (``microbatch_token_mean``) both coincide, for other modes we aggregate
the entropy terms like the others (consistent normalisation, documented deviation).
Entropy estimators: ``sampled`` -> H = -log pi(o_t) (PAPO; minimising it lowers entropy),
``exact`` -> the full-vocabulary entropy passed in. ``aug_mode``: ``detached`` (published: the
masked view is a no-grad constant; its inputs are detached here to be safe, so the eta2 term
has no gradient) or ``live`` (masked-view tensors keep their gradient). ``kl_exact`` cannot be
detached partially: in detached mode the trainer computes it from no-grad masked logits.

Metrics contract: every value in the returned dict is a detached scalar that is this
micro-batch's **additive share** of the mini-batch value. The trainer SUMS each metric over the
micro-batches of a mini-batch and all-reduces with SUM over data-parallel ranks (the same
reduction as the gradients). ``loss/*`` use the loss's aggregation mode (their sum is the
mini-batch objective; ``loss/kl_prcp`` is -agg(KL_prcp), the reference's sign); ``kl/*``,
``entropy/*``, ``clipfrac/*``, ``ppo_kl``, ``rollout_corr/*`` are global token means (share = sum(v m) / global_tokens).
Scheduled coefficients (gamma, discount) are not in the dict: log them from the LossSpec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_papo.algos.aggregate import AGGREGATIONS, Number, aggregate
from megatron_papo.algos.kl import KL_ESTIMATORS, kl_estimate
from megatron_papo.algos.papo import (
    GAMMA_SCHEDULES,
    KL_PRCP_ESTIMATORS,
    entropy_discount,
    kl_prcp_gamma,
    kl_prcp_per_token,
    shape_kl_prcp,
)
from megatron_papo.algos.policy_loss import ppo_clip_loss
from megatron_papo.algos.rollout_correction import LEVELS, ROLLOUT_CORRECTIONS, rollout_correction_weights


@dataclass
class LossInputs:
    """Per-token tensors ``[B, T]`` of one micro-batch (response positions only).

    ``logprob`` carries the gradient; ``old_logprob`` (theta_old, rollout time) and ``ref_logprob``
    are constants. ``aug_logprob`` / ``aug_entropy`` are the masked view (constants in detached
    mode). ``entropy`` / ``aug_entropy`` are exact entropies (needed with entropy_estimator=exact),
    ``kl_exact`` the exact per-token KL(original || masked) (kl_prcp_estimator=exact).
    ``advantages`` is ``[B]`` or ``[B, T]``. Values at padded positions (mask 0) are ignored and may
    be anything, including inf/nan. From ``ops.vocab_parallel.token_stats`` with the masked view as
    its second view: ``logprob``/``entropy`` <- ``.logprob``/``.entropy``, ``aug_logprob`` <-
    ``.ref_logprob``, ``aug_entropy`` <- ``.ref_entropy``, ``kl_exact`` <- ``.kl`` (KL(original || masked)).
    ``rollout_logprob`` is the engine's log-prob of each sampled token (a constant; needed by a rollout correction).
    """

    logprob: torch.Tensor
    old_logprob: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor
    ref_logprob: Optional[torch.Tensor] = None
    aug_logprob: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    aug_entropy: Optional[torch.Tensor] = None
    kl_exact: Optional[torch.Tensor] = None
    rollout_logprob: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LossSpec:
    """Plain numbers/strings the loss needs for one step (no config objects inside the math)."""

    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_dual: float = 3.0
    ppo_log_ratio_clamp: float = 20.0
    agg_mode: str = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    log_ratio_clamp: Optional[float] = 20.0
    kl_value_clamp: Optional[float] = 10.0
    use_kl_prcp: bool = False
    kl_prcp_coef: float = 0.0
    kl_prcp_estimator: str = "k3_sampled"
    kl_prcp_clip: float = 0.0
    kl_prcp_top_p: float = 0.0
    ori_entropy_coef: float = 0.0
    aug_entropy_coef: float = 0.0
    entropy_discount: float = 1.0
    entropy_estimator: str = "sampled"
    aug_mode: str = "detached"
    rollout_correction: str = "none"
    rollout_correction_level: str = "token"
    rollout_correction_cap: float = 2.0
    rollout_correction_lower: float = 0.0

    def __post_init__(self) -> None:
        AGGREGATIONS.get(self.agg_mode)
        KL_ESTIMATORS.get(self.kl_estimator)
        for name, value, known in (("kl_prcp_estimator", self.kl_prcp_estimator, KL_PRCP_ESTIMATORS),
                                   ("entropy_estimator", self.entropy_estimator, ("sampled", "exact")),
                                   ("aug_mode", self.aug_mode, ("detached", "live"))):
            if value not in known:
                raise KeyError(f"unknown {name} '{value}'; known: {', '.join(known)}")
        if not 0.0 <= self.kl_prcp_top_p < 1.0:
            raise ValueError(f"kl_prcp_top_p must be in [0, 1) (0 = off), got {self.kl_prcp_top_p}")
        if self.rollout_correction != "none":
            ROLLOUT_CORRECTIONS.get(self.rollout_correction)
        if self.rollout_correction_level not in LEVELS:
            raise KeyError(f"unknown rollout_correction_level '{self.rollout_correction_level}'; known: {', '.join(LEVELS)}")

    @classmethod
    def from_config(cls, algo_cfg: Any, step: int, total_steps: int) -> LossSpec:
        """The spec at training ``step`` (0-based) of ``total_steps`` from an ``AlgoConfig``."""
        a = algo_cfg
        if a.kl_prcp_schedule not in GAMMA_SCHEDULES:
            raise KeyError(f"unknown kl_prcp schedule '{a.kl_prcp_schedule}'; known: {', '.join(GAMMA_SCHEDULES)}")
        annealing = a.kl_prcp_schedule == "annealing"
        use_kl_prcp = a.kl_prcp_coef > 0 or (annealing and (a.kl_prcp_anneal_start or 0.0) > 0)
        gamma = kl_prcp_gamma(step, total_steps, schedule=a.kl_prcp_schedule, coef=a.kl_prcp_coef,
                              start=a.kl_prcp_anneal_start, end=a.kl_prcp_anneal_end,
                              ratio=a.kl_prcp_anneal_ratio) if use_kl_prcp else 0.0
        return cls(
            clip_low=a.clip_ratio_low, clip_high=a.clip_ratio_high, clip_dual=a.clip_ratio_dual,
            agg_mode=a.loss_agg_mode, kl_coef=a.kl_coef if a.use_ref else 0.0, kl_estimator=a.kl_estimator,
            log_ratio_clamp=a.log_ratio_clamp if a.log_ratio_clamp > 0 else None,
            kl_value_clamp=a.kl_value_clamp if a.kl_value_clamp > 0 else None,
            use_kl_prcp=use_kl_prcp, kl_prcp_coef=gamma, kl_prcp_estimator=a.kl_prcp_estimator,
            kl_prcp_clip=a.kl_prcp_clip, kl_prcp_top_p=a.kl_prcp_top_p,
            ori_entropy_coef=a.ori_entropy_coef, aug_entropy_coef=a.aug_entropy_coef,
            entropy_discount=entropy_discount(gamma, a.kl_prcp_coef) if use_kl_prcp else 1.0,
            entropy_estimator=a.entropy_estimator, aug_mode=a.aug_mode, rollout_correction=a.rollout_correction,
            rollout_correction_level=a.rollout_correction_level, rollout_correction_cap=a.rollout_correction_cap,
            rollout_correction_lower=a.rollout_correction_lower)

    def replace(self, **changes: Any) -> LossSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _maybe_detach(t: Optional[torch.Tensor], detach: bool) -> Optional[torch.Tensor]:
    return None if t is None else (t.detach() if detach else t)


def _clean(x: LossInputs) -> LossInputs:
    """Inputs promoted to >= float32 with padded positions set to 0 (so inf/nan there cannot poison gradients)."""
    keep = x.response_mask > 0

    def fix(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        if t.shape != keep.shape:
            raise ValueError(f"per-token input of shape {tuple(t.shape)} does not match response_mask {tuple(keep.shape)}")
        t = t if t.dtype == torch.float64 else t.float()
        return torch.where(keep, t, torch.zeros_like(t))

    adv = x.advantages if x.advantages.dim() == 1 else fix(x.advantages)
    return LossInputs(fix(x.logprob), fix(x.old_logprob), adv, x.response_mask, fix(x.ref_logprob), fix(x.aug_logprob),
                      fix(x.entropy), fix(x.aug_entropy), fix(x.kl_exact), fix(x.rollout_logprob))


def _entropy_terms(x: LossInputs, spec: LossSpec) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(H_ori, H_aug) per token by the configured estimator; None where the input is absent."""
    detach = spec.aug_mode == "detached"
    if spec.entropy_estimator == "sampled":
        aug = _maybe_detach(x.aug_logprob, detach)
        return -x.logprob, (None if aug is None else -aug)
    return x.entropy, _maybe_detach(x.aug_entropy, detach)


def papo_loss(inputs: LossInputs, spec: LossSpec, *, global_tokens: Optional[Number], global_seqs: Optional[Number],
              num_microbatches: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the mini-batch loss and its metrics (see module docstring).

    Normalisers (:mod:`aggregate`): ``global_tokens`` / ``global_seqs`` count the whole mini-batch
    over micro-batches and DP ranks, ``num_microbatches`` likewise; None = this micro-batch alone.
    """
    x, mask = _clean(inputs), inputs.response_mask
    agg_kw = dict(global_tokens=global_tokens, global_seqs=global_seqs, num_microbatches=num_microbatches)

    def agg(v: torch.Tensor) -> torch.Tensor:
        return aggregate(v, mask, spec.agg_mode, **agg_kw)

    def tok_mean(v: torch.Tensor) -> torch.Tensor:
        return aggregate(v.detach(), mask, "token_mean", **agg_kw)

    metrics: dict[str, torch.Tensor] = {}
    pg = ppo_clip_loss(x.logprob, x.old_logprob, x.advantages, clip_low=spec.clip_low, clip_high=spec.clip_high,
                       clip_dual=spec.clip_dual, log_ratio_clamp=spec.ppo_log_ratio_clamp)
    pg_BT = pg.loss_BT
    if spec.rollout_correction != "none":
        if x.rollout_logprob is None:
            raise ValueError(f"rollout_correction={spec.rollout_correction} needs rollout_logprob (the engine's log-probs)")
        corr = rollout_correction_weights(x.old_logprob, x.rollout_logprob, mask, method=spec.rollout_correction,
                                          level=spec.rollout_correction_level, cap=spec.rollout_correction_cap,
                                          lower=spec.rollout_correction_lower)
        pg_BT = pg_BT * corr.weight_BT
        metrics["rollout_corr/weight_mean"] = tok_mean(corr.weight_BT)
        metrics["rollout_corr/corrected_frac"] = tok_mean(corr.corrected_BT)
    total = agg(pg_BT)
    metrics["loss/pg"] = total.detach()
    metrics["clipfrac/high"] = tok_mean(pg.clip_high_BT)
    metrics["clipfrac/low"] = tok_mean(pg.clip_low_BT)
    metrics["ppo_kl"] = tok_mean(pg.ppo_kl_BT)

    if x.ref_logprob is not None or spec.kl_coef > 0:
        if x.ref_logprob is None:
            raise ValueError(f"kl_coef={spec.kl_coef} > 0 needs ref_logprob (reference-model log-probs)")
        kl_ref = kl_estimate(spec.kl_estimator, x.logprob, x.ref_logprob.detach(),
                             log_ratio_clamp=spec.log_ratio_clamp, value_clamp=spec.kl_value_clamp)
        kl_ref_agg = agg(kl_ref)
        if spec.kl_coef > 0:
            total = total + spec.kl_coef * kl_ref_agg
        metrics["loss/kl_ref"] = kl_ref_agg.detach()
        metrics["kl/ref"] = tok_mean(kl_ref)

    detach_aug = spec.aug_mode == "detached"
    has_aug = x.aug_logprob is not None if spec.kl_prcp_estimator == "k3_sampled" else x.kl_exact is not None
    if spec.use_kl_prcp or has_aug:
        kl_prcp = kl_prcp_per_token(x.logprob, estimator=spec.kl_prcp_estimator,
                                    aug_logprob_BT=_maybe_detach(x.aug_logprob, detach_aug), kl_exact_BT=x.kl_exact,
                                    log_ratio_clamp=spec.log_ratio_clamp, value_clamp=spec.kl_value_clamp)
        kl_prcp = shape_kl_prcp(kl_prcp, mask, top_p=spec.kl_prcp_top_p, clip=spec.kl_prcp_clip)
        kl_prcp_agg = agg(kl_prcp)
        if spec.use_kl_prcp and spec.kl_prcp_coef != 0:
            total = total - spec.kl_prcp_coef * kl_prcp_agg
        metrics["loss/kl_prcp"] = -kl_prcp_agg.detach()
        metrics["kl/prcp"] = tok_mean(kl_prcp)

    h_ori, h_aug = _entropy_terms(x, spec)
    for name, h, coef in (("ori", h_ori, spec.ori_entropy_coef), ("aug", h_aug, spec.aug_entropy_coef)):
        if h is None:
            if coef > 0:
                need = "aug_logprob" if spec.entropy_estimator == "sampled" else f"{'' if name == 'ori' else 'aug_'}entropy"
                raise ValueError(f"{name}_entropy_coef={coef} > 0 with entropy_estimator={spec.entropy_estimator} needs {need}")
            continue
        h_agg = agg(h)
        if coef > 0:
            total = total + coef * spec.entropy_discount * h_agg
        metrics[f"loss/{name}_entropy"] = h_agg.detach()
        metrics[f"entropy/{name}"] = tok_mean(h)

    metrics["loss/total"] = total.detach()
    return total, metrics
