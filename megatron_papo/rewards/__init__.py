"""Reward functions by name: ``get_reward_fn("math" | "synthetic")(responses, answers) -> list[dict]``.

Each returned dict has ``overall`` (the score used for advantages), ``format`` and ``accuracy``
(used by DAPO's group filter), all floats.
"""

from megatron_papo.rewards.registry import RewardFn, get_reward_fn, reward_names

__all__ = ["RewardFn", "get_reward_fn", "reward_names"]
