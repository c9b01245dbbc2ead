"""PPO clipped surrogate with asymmetric clip and dual-clip, per token (papo_spec §2.3).

    d      = clamp(l - l_old, -log_ratio_clamp, +log_ratio_clamp)        (20 in the reference)
    r      = exp(d)
    r_clip = exp(clamp(d, log(1 - eps_low), log(1 + eps_high)))
    L1 = -A r,  L2 = -A r_clip,  L3 = -A c_dual
    L  = max(L1, L2)                 if A >= 0
    L  = min(max(L1, L2), L3)        if A <  0      (dual-clip caps the loss at c_dual * |A|)

Clip indicators follow the reference code's definitions (float 0/1 per token):
``clip_high`` = the eps-clip is active (L1 < L2: ratio outside the trust region on the side
that matters for the sign of A) -- the reference's ``pg_clipfrac_higher``;
``clip_low`` = the dual-clip is active (A < 0 and max(L1, L2) > L3) -- ``pg_clipfrac_lower``.
``ppo_kl`` = ``-d`` = l_old - l (clamped), the reference's per-token ``ppo_kl``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PolicyLossOut:
    """Per-token outputs ``[B, T]`` of :func:`ppo_clip_loss` (indicators and ppo_kl are detached)."""

    loss_BT: torch.Tensor
    clip_high_BT: torch.Tensor
    clip_low_BT: torch.Tensor
    ppo_kl_BT: torch.Tensor


def ppo_clip_loss(logprob_BT: torch.Tensor, old_logprob_BT: torch.Tensor, adv_BT: torch.Tensor, *,
                  clip_low: float = 0.2, clip_high: float = 0.3, clip_dual: float = 3.0,
                  log_ratio_clamp: float = 20.0) -> PolicyLossOut:
    """Per-token clipped surrogate loss (to be minimised); ``adv_BT`` may be ``[B]`` (broadcast)."""
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if clip_dual <= 1.0:
        raise ValueError(f"clip_dual must be > 1 (dual-clip PPO), got {clip_dual}")
    if adv_BT.dim() == 1:
        adv_BT = adv_BT.unsqueeze(-1)
    adv_BT = adv_BT.detach().to(logprob_BT.dtype)
    d = (logprob_BT - old_logprob_BT.detach()).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(d)
    ratio_clipped = torch.exp(d.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)))
    l1 = -adv_BT * ratio
    l2 = -adv_BT * ratio_clipped
    l3 = -adv_BT * clip_dual
    upper = torch.maximum(l1, l2)
    loss = torch.where(adv_BT < 0, torch.minimum(upper, l3), upper)
    with torch.no_grad():
        clip_high_ind = (l1 < l2).to(logprob_BT.dtype)
        clip_low_ind = ((upper > l3) & (adv_BT < 0)).to(logprob_BT.dtype)
        ppo_kl = -d.detach()
    return PolicyLossOut(loss, clip_high_ind.expand_as(loss), clip_low_ind.expand_as(loss), ppo_kl)
