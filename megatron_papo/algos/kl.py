"""Per-token KL estimators k1 / k2 / k3 on sampled-token log-probs (papo_spec §2.4, §3).

With ``x = clamp(l_ref - l, -log_ratio_clamp, +log_ratio_clamp)`` (log of pi_ref / pi_theta):

- ``k1`` = ``-x``            (reference name ``kl``:  l - l_ref)
- ``k2`` = ``x**2 / 2``      (reference name ``mse``)
- ``k3`` = ``exp(x) - x - 1`` (reference name ``low_var_kl``, Schulman's estimator; always >= 0)

then every value is clamped to ``[-value_clamp, +value_clamp]``. Defaults (20, 10) are the
reference code's clamps for k3; note that a clamp **zeroes the gradient** of the tokens it hits.
Deviation, documented: the reference code clamps only k3; here the two (configurable) clamps
apply to every estimator (pass ``None`` to disable either). With the defaults, k1/k2 differ
from the reference only for tokens whose log-ratio exceeds 10 (k1) or sqrt(20)~4.5 (k2).

The same function computes PAPO's perception KL by passing the masked-view log-probs as
``ref_logprob`` (ratio pi_mask / pi_theta, the reference code's direction). Inputs are cast to
float32 at least (float64 stays float64), as the reference casts to fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from megatron_papo.algos.registry import Registry

KL_ESTIMATORS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def _k1(x: torch.Tensor) -> torch.Tensor:
    return -x


@KL_ESTIMATORS.register("k2")
def _k2(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x.square()


@KL_ESTIMATORS.register("k3")
def _k3(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x) - x - 1.0


def _promote(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def kl_estimate(name: str, logprob_BT: torch.Tensor, ref_logprob_BT: torch.Tensor, *,
                log_ratio_clamp: Optional[float] = 20.0, value_clamp: Optional[float] = 10.0) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs ``[B, T]``.

    Gradient flows through whichever inputs carry it (normally ``logprob_BT`` only).
    """
    fn = KL_ESTIMATORS.get(name)
    x = _promote(ref_logprob_BT) - _promote(logprob_BT)
    if log_ratio_clamp is not None:
        x = x.clamp(-log_ratio_clamp, log_ratio_clamp)
    value = fn(x)
    if value_clamp is not None:
        value = value.clamp(-value_clamp, value_clamp)
    return value
