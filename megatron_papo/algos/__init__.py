"""Pure tensor functions of PAPO / GRPO / DAPO: advantages, PPO loss, KL estimators, PAPO terms.

How the trainer uses them (one training step)::

    rewards = get_reward_fn(cfg.data.reward)(responses, answers)        # megatron_papo.rewards
    # DAPO: dapo.fill_batch(draw_fn, target_groups, max_tries, keep_fn=..., on_limit=...) while drawing
    scores_B = tensor([r["overall"] for r in rewards]) (+ dapo.overlong_penalty(...) if enabled)
    adv_B = compute_advantages(cfg.algo.adv_estimator, scores_B, group_ids)
    spec = LossSpec.from_config(cfg.algo, step, total_steps)             # gamma / discount for this step
    # per mini-batch: tokens, seqs = sum of count_normalisers(mask) over its micro-batches, all-reduced
    # (SUM) over DP; num_microbatches = micro-batches per rank * DP size
    for each micro-batch:
        loss, metrics = papo_loss(LossInputs(...), spec, global_tokens=tokens, global_seqs=seqs,
                                  num_microbatches=num_microbatches)
        loss.backward()                                                  # no further scaling
    # gradients: all-reduce SUM over DP (not average); metrics: SUM over micro-batches and DP ranks
"""

from megatron_papo.algos.advantages import compute_advantages
from megatron_papo.algos.aggregate import aggregate, count_normalisers
from megatron_papo.algos.compose import LossInputs, LossSpec, papo_loss

__all__ = ["LossInputs", "LossSpec", "aggregate", "compute_advantages", "count_normalisers", "papo_loss"]
