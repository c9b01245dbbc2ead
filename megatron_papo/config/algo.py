"""Config section ``algo``: advantage estimator, policy loss, reference KL and the PAPO terms.

Defaults are PAPO-G (GRPO + PAPO) as released: see ../shared/papo_spec.md §2 and §6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_papo.config.base import ConfigError, field

# Names implemented in megatron_papo.algos (kept here so the config does not import torch;
# tests/unit/test_algos_config.py checks they equal the algorithm registries).
ADV_ESTIMATORS = ("dapo", "drgrpo", "grpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("microbatch_token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_mean")
ROLLOUT_CORRECTIONS = ("mis", "tis")


@dataclass
class AlgoConfig:
    """What the loss computes. PAPO is on when ``kl_prcp_coef > 0``."""

    adv_estimator: str = field("grpo", help="advantage estimator: grpo | dapo | drgrpo | rloo")
    clip_ratio_low: float = field(0.2, help="PPO epsilon_low")
    clip_ratio_high: float = field(0.3, help="PPO epsilon_high (clip-higher; DAPO uses 0.28)")
    clip_ratio_dual: float = field(3.0, help="dual-clip constant c for negative advantages")
    loss_agg_mode: str = field(
        "token_mean",
        help="token_mean | microbatch_token_mean (reference code) | seq_mean_token_mean | seq_mean_token_sum")
    use_ref: bool = field(True, help="keep a frozen reference model and add the reference-KL loss")
    kl_coef: float = field(0.01, help="beta of the reference-KL loss")
    kl_estimator: str = field("k3", help="reference-KL estimator: k1 | k2 | k3 (low_var_kl)")
    log_ratio_clamp: float = field(20.0, help="clamp of log-ratios inside the k-estimators (ref KL and KL_prcp); 0 = off")
    kl_value_clamp: float = field(10.0, help="clamp of per-token k-estimator values to [-v, v] (zeroes their grad); 0 = off")
    kl_prcp_coef: float = field(0.02, help="gamma of the implicit perception loss (0 = plain GRPO/DAPO)")
    kl_prcp_estimator: Literal["k3_sampled", "exact"] = field(
        "k3_sampled", help="k3 on sampled-token log-probs, ratio masked/original (published) or exact full-vocab KL")
    kl_prcp_schedule: Literal["constant", "annealing"] = field("constant", help="gamma schedule")
    kl_prcp_anneal_start: Optional[float] = field(None, help="gamma at step 0 with annealing; null = kl_prcp_coef")
    kl_prcp_anneal_end: float = field(0.0, help="gamma at the end of annealing")
    kl_prcp_anneal_ratio: float = field(
        0.5, help="fraction of total steps over which gamma anneals (reference default 0.5); entropy coefs scale by gamma/kl_prcp_coef")
    kl_prcp_clip: float = field(0.0, help="clip per-token KL_prcp to [0, value]; 0 = off")
    kl_prcp_top_p: float = field(
        0.0, help="keep tokens whose KL_prcp is >= the per-sequence (1 - top_p) quantile; 0 = off, else in (0, 1)")
    ori_entropy_coef: float = field(0.0, help="eta1: + eta1 * mean(-log pi) on the original view (entropy minimisation)")
    aug_entropy_coef: float = field(0.0, help="eta2: same on the masked view")
    entropy_estimator: Literal["sampled", "exact"] = field("sampled", help="-log pi of the sampled token, or exact")
    aug_mode: Literal["detached", "live"] = field(
        "detached", help="masked view from a no-grad forward at theta_old (published) or with gradient")
    dynamic_sampling: bool = field(False, help="DAPO: keep only groups with mean accuracy in (low, high)")
    dynamic_sampling_low: float = field(0.01, help="DAPO filter lower bound (exclusive)")
    dynamic_sampling_high: float = field(0.99, help="DAPO filter upper bound (exclusive)")
    dynamic_sampling_key: str = field(
        "accuracy", help="DAPO filter on the group mean of this reward component (accuracy | overall | format; EasyR1's "
        "filter_key: its YAML says overall, PAPO's DAPO scripts accuracy)")
    dynamic_sampling_max_tries: int = field(20, help="DAPO: draws before giving up filling the batch; <= 0 = unlimited")
    dynamic_sampling_on_limit: Literal["raise", "warn"] = field(
        "raise", help="DAPO at the try limit: raise (reference) or warn and train on the partial batch")
    overlong_buffer: int = field(
        0, help="DAPO soft overlong punishment: L_cache, the last tokens before rollout.max_new_tokens (L_max) over "
        "which the score falls linearly by up to overlong_penalty; 0 = off (PAPO's scripts: off)")
    overlong_penalty: float = field(1.0, help="DAPO soft overlong punishment factor (EasyR1 overlong_penalty_factor): "
                                    "the score loses this much at L_max")
    rollout_correction: str = field(
        "none", help="rollout-training mismatch correction of the policy-gradient term, with rho = pi_old/mu (trainer "
        "log-prob at the update's start weights over the engine's log-prob of the sampled token): none | tis (weight "
        "min(rho, cap), Yao et al. 2025) | mis (weight rho inside [rollout_correction_lower, cap], 0 outside: IcePop "
        "per token, Seq-MIS per sequence); PAPO's KL and entropy terms are not weighted")
    rollout_correction_level: Literal["token", "sequence"] = field(
        "token", help="ratio per token (rho_t) or per response (rho = prod_t rho_t, applied to all its tokens)")
    rollout_correction_cap: float = field(2.0, help="C: the TIS truncation / the MIS upper bound (>= 1)")
    rollout_correction_lower: float = field(
        0.0, help="mis only: the lower bound of the kept ratios, in [0, 1] (0 = one-sided; IcePop uses 0.5 with cap 5)")

    def __post_init__(self) -> None:
        for name, known in (("adv_estimator", ADV_ESTIMATORS), ("kl_estimator", KL_ESTIMATORS),
                            ("loss_agg_mode", LOSS_AGG_MODES), ("rollout_correction", ("none", *ROLLOUT_CORRECTIONS))):
            value = getattr(self, name)
            if value not in known:
                raise ConfigError(f"algo.{name}: got {value!r}, expected one of {', '.join(known)}")
        if not 0.0 <= self.clip_ratio_low < 1.0:
            raise ConfigError(f"algo.clip_ratio_low: got {self.clip_ratio_low}, expected 0 <= value < 1")
        if self.clip_ratio_high < 0.0:
            raise ConfigError(f"algo.clip_ratio_high: got {self.clip_ratio_high}, expected >= 0")
        if self.clip_ratio_dual <= 1.0:
            raise ConfigError(f"algo.clip_ratio_dual: got {self.clip_ratio_dual}, expected > 1 (dual-clip PPO; default 3)")
        for name in ("kl_coef", "kl_prcp_coef", "kl_prcp_clip", "ori_entropy_coef", "aug_entropy_coef",
                     "log_ratio_clamp", "kl_value_clamp", "overlong_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"algo.{name}: got {getattr(self, name)}, expected >= 0")
        if not 0.0 <= self.kl_prcp_top_p < 1.0:
            raise ConfigError(f"algo.kl_prcp_top_p: got {self.kl_prcp_top_p}, expected 0 (off) or a fraction in (0, 1)")
        if not 0.0 < self.kl_prcp_anneal_ratio <= 1.0:
            raise ConfigError(f"algo.kl_prcp_anneal_ratio: got {self.kl_prcp_anneal_ratio}, expected a fraction in (0, 1]")
        if not 0.0 <= self.dynamic_sampling_low < self.dynamic_sampling_high <= 1.0:
            raise ConfigError(f"algo.dynamic_sampling_low/high: got ({self.dynamic_sampling_low}, "
                              f"{self.dynamic_sampling_high}), expected 0 <= low < high <= 1")
        if self.dynamic_sampling_key not in ("accuracy", "overall", "format"):
            raise ConfigError(f"algo.dynamic_sampling_key: got {self.dynamic_sampling_key!r}, expected accuracy | overall | format")
        if self.overlong_buffer < 0:
            raise ConfigError(f"algo.overlong_buffer: got {self.overlong_buffer}, expected >= 0 (0 = off)")
        if not self.rollout_correction_cap >= 1.0:
            raise ConfigError(f"algo.rollout_correction_cap: got {self.rollout_correction_cap}, expected >= 1 (a ratio of 1 "
                              "is on-policy and must keep its weight)")
        if not 0.0 <= self.rollout_correction_lower <= 1.0:
            raise ConfigError(f"algo.rollout_correction_lower: got {self.rollout_correction_lower}, expected a value in [0, 1]")
        if self.rollout_correction_lower > 0 and self.rollout_correction != "mis":
            raise ConfigError(f"algo.rollout_correction_lower={self.rollout_correction_lower} is a bound of "
                              f"rollout_correction=mis (got {self.rollout_correction}); set it to 0 or use mis")
