"""First-step invariants (design rule 7) with thresholds that follow the compute precision.

* **actor == reference** at step 1: both models start from the same weights, so their log-probs of the
  step's tokens agree (max over tokens).
* **PPO ratio == 1** on the first mini-batch of the first PPO epoch of every step: the old log-probs were
  computed with the weights the update starts from (mean ``ppo_kl`` over tokens). Later mini-batches and
  epochs run after optimizer steps, where the ratio differs from 1 by design.

Tolerances: a log-prob is a difference of logits ``z`` (|z| up to ~16 for a trained LM) rounded to the
compute dtype, so two forward passes that take different kernels (train vs. eval mode, a paired batch of
twice the rows, Transformer Engine's FP8 scaling) may differ by a few ulps of 16: the max-over-tokens gap
is checked against ``16 * eps(dtype)`` and the token mean against ``eps(dtype)`` (floored at 1e-5). That
is 1e-5 in fp32 (what the CPU runs meet with 1e-7 to spare), 0.125 / 0.0078 in bf16 and 2.0 / 0.125 with
FP8 (e4m3) GEMMs. The GPU suite (``tests/gpu/``) prints the measured gaps so a real run can tighten them;
``check_invariants_tol`` overrides both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

FLOOR = 1e-5


class InvariantError(RuntimeError):
    """A first-step invariant (actor == reference log-probs, PPO ratio == 1) does not hold."""


def invariant_tolerances(dtype: torch.dtype, fp8: bool = False, override: Optional[float] = None) -> tuple[float, float]:
    """``(max_gap_tol, mean_tol)`` for log-probs computed in ``dtype`` (with FP8 GEMMs when ``fp8``)."""
    if override is not None:
        return float(override), float(override)
    eps = torch.finfo(torch.float8_e4m3fn if fp8 else dtype).eps
    return max(FLOOR, 16 * eps), max(FLOOR, eps)


@dataclass
class InvariantChecker:
    """Raises :class:`InvariantError` when an invariant fails (nothing when ``enabled`` is False)."""

    enabled: bool
    gap_tol: float
    mean_tol: float

    @classmethod
    def for_dtype(cls, enabled: bool, dtype: torch.dtype, fp8: bool = False, override: Optional[float] = None
                  ) -> InvariantChecker:
        gap, mean = invariant_tolerances(dtype, fp8, override)
        return cls(enabled=enabled, gap_tol=gap, mean_tol=mean)

    def actor_ref(self, step: int, gap: Optional[float]) -> None:
        """Step 1: the largest |actor - reference| log-prob over the step's response tokens."""
        if self.enabled and step == 1 and gap is not None and not gap <= self.gap_tol:
            raise InvariantError(f"step 1: actor and reference log-probs differ by {gap:.3g} (> {self.gap_tol:.3g}; "
                                 "expected equal: both start from the same weights)")

    def ppo_ratio(self, step: int, epoch: int, mini_batch: int, ppo_kl: Optional[float]) -> None:
        """The first mini-batch of the first PPO epoch: mean old - new log-prob (``ppo_kl``) is ~0.

        A non-finite ``ppo_kl`` is a diverged forward, not stale old log-probs: its gradients are non-finite too,
        and the non-finite guard (``nonfinite.py``) skips and counts the step instead of stopping the run here."""
        if not self.enabled or epoch != 0 or mini_batch != 0 or ppo_kl is None or not math.isfinite(ppo_kl):
            return
        if not abs(ppo_kl) <= self.mean_tol:
            raise InvariantError(f"step {step}: PPO ratio != 1 on the first mini-batch (ppo_kl={ppo_kl:.3g}, "
                                 f"> {self.mean_tol:.3g}): the old log-probs were not computed with the current weights")
