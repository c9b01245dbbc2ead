"""Reward functions: ``fn(responses, answers) -> list[dict]`` by registered name (``math`` | ``synthetic``) or plugin
(``path/to/file.py:fn``, see ``rewards/plugin.py``); :func:`build_reward_fn` wraps one in the worker pool with a
per-call timeout (``rewards/pool.py``) that the trainer and evaluation call.

Each returned dict has ``overall`` (the score used for advantages), ``format`` and ``accuracy``
(used by DAPO's group filter), all floats.
"""

from typing import Any

from megatron_papo.rewards.registry import RewardFn, get_reward_fn, reward_names


def build_reward_fn(data_cfg: Any) -> Any:
    """``data.reward`` as a ``RewardPool``: ``reward_workers`` processes, ``reward_timeout_s`` per call,
    ``format_weight`` passed to functions that take it."""
    from megatron_papo.rewards.pool import RewardPool

    return RewardPool(data_cfg.reward, format_weight=data_cfg.format_weight, workers=data_cfg.reward_workers,
                      timeout_s=data_cfg.reward_timeout_s)


def score(reward_fn: Any, responses: list[str], answers: list[str], ids: list[str]) -> list[dict[str, float]]:
    """``reward_fn(responses, answers)``, passing the samples' ids (for failure logs) to a reward_fn that takes them
    (``takes_sample_ids = True``, as ``RewardPool``); any plain callable works too."""
    if getattr(reward_fn, "takes_sample_ids", False):
        return reward_fn(responses, answers, ids=ids)
    return reward_fn(responses, answers)


__all__ = ["RewardFn", "build_reward_fn", "get_reward_fn", "reward_names", "score"]
