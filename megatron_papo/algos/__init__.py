"""Pure tensor functions of PAPO / GRPO / DAPO: advantages, PPO loss, KL estimators, PAPO terms.

The trainer calls :func:`compute_advantages` once per rollout batch, :func:`papo_loss` once per
micro-batch (with a :class:`LossSpec` from ``LossSpec.from_config(cfg.algo, step, total_steps)``),
and the DAPO helpers in :mod:`megatron_papo.algos.dapo` while building a batch.
"""

from megatron_papo.algos.advantages import compute_advantages
from megatron_papo.algos.aggregate import aggregate, count_normalisers
from megatron_papo.algos.compose import LossInputs, LossSpec, papo_loss

__all__ = ["LossInputs", "LossSpec", "aggregate", "compute_advantages", "count_normalisers", "papo_loss"]
