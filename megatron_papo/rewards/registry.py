"""Registry of batch reward functions ``fn(responses, answers) -> list[{overall, format, accuracy}]``; plugins by path."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from megatron_papo.utils.registry import Registry

RewardFn = Callable[[list[str], list[str]], list[dict[str, float]]]
REWARDS: Registry[RewardFn] = Registry("reward function")
_BUILTIN_MODULES = ("megatron_papo.rewards.math", "megatron_papo.rewards.synthetic")


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)   # registers on import


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as ``name`` (or a plugin ``path/to/file.py:fn``, ``rewards/plugin.py``);
    unknown names fail listing the known ones."""
    if ".py:" in name:
        from megatron_papo.rewards.plugin import load_plugin

        return load_plugin(name)
    _load_builtins()
    return REWARDS.get(name)


def reward_names() -> list[str]:
    """Names of the registered reward functions."""
    _load_builtins()
    return REWARDS.names()


def check_batch(responses: list[str], answers: list[str]) -> None:
    """Raise if the two lists differ in length (one ground truth per response)."""
    if len(responses) != len(answers):
        raise ValueError(f"got {len(responses)} responses but {len(answers)} answers; pass one answer per response")
