"""The non-finite guard's run-level half: count steps whose update was skipped and stop a diverged run.

The step-level half is :func:`megatron_papo.parallel.training.guarded_step` (a non-finite loss or grad norm
skips the optimizer update on every rank). A training step counts as *skipped* when any of its updates was
skipped; ``optim.max_skipped_steps`` consecutive skipped steps stop the run with :class:`DivergedError`
(exit code 3, one line). Checkpoints are never written from non-finite weights (``checkpoint/dist.py``).
"""

from __future__ import annotations

from megatron_papo.errors import DivergedError


class SkippedSteps:
    """Consecutive-skip counter; ``max_consecutive=0`` never stops."""

    def __init__(self, max_consecutive: int, consecutive: int = 0) -> None:
        self.max_consecutive = int(max_consecutive)
        self.consecutive = int(consecutive)

    def update(self, step: int, skipped_updates: int, grad_norm: float = float("nan")) -> None:
        """Record ``step`` (``skipped_updates`` of its updates were skipped); raise DivergedError at the limit."""
        self.consecutive = self.consecutive + 1 if skipped_updates > 0 else 0
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise DivergedError(
                f"step {step}: {self.consecutive} consecutive steps had a non-finite loss or grad norm (last grad norm "
                f"{grad_norm:.4g}; updates skipped, weights kept finite); stopping (optim.max_skipped_steps="
                f"{self.max_consecutive}). Lower optim.lr or optim.clip_grad and resume from the last checkpoint")
