"""Reward plugins: ``data.reward=path/to/file.py:fn`` loads a user function (registry names still work).

The signature (the same as the built-in ``math`` and ``synthetic`` rewards)::

    def fn(responses: list[str], answers: list[str], format_weight: float = 0.1) -> list[dict[str, float]]:
        # one dict per response, in order: "overall" (the score behind the advantages, required) and
        # optionally "accuracy" (DAPO's group filter, eval accuracy, reward/accuracy) and "format"
        return [{"overall": float(r.strip() == a), "accuracy": float(r.strip() == a)} for r, a in zip(responses, answers)]

- ``responses`` are the decoded responses of one call (the n samples of one prompt during training),
  ``answers`` the ground truth of each (``data.answer_key``), as strings.
- ``format_weight`` (``data.format_weight``) is passed only when the function has a parameter of that name
  or ``**kwargs``.
- Every value must be a finite number. A result of the wrong length or type counts as a failure.
- The file is imported once in the training process (to fail early) and once in every reward worker
  (``data.reward_workers``, spawned processes): keep module-level code cheap and free of side effects.

Failures (exceptions, timeouts, bad results) never stop the run: see ``rewards/pool.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from megatron_papo.config.base import ConfigError


def is_plugin_spec(spec: str) -> bool:
    """``path/to/file.py:fn`` (as opposed to a registered name)."""
    return ".py:" in spec


def load_plugin(spec: str) -> Callable[..., list[dict[str, float]]]:
    """Import ``path/to/file.py`` (relative paths from the working directory) and return its ``fn``."""
    path_s, _, name = spec.rpartition(":")
    path = Path(path_s).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"data.reward={spec}: no file {path}; expected path/to/file.py:function_name")
    mod_name = f"megatron_papo_reward_plugin_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    module = sys.modules.get(mod_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"data.reward={spec}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"data.reward={spec}: importing {path} failed: {type(e).__name__}: {e}") from None
        sys.modules[mod_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == mod_name)
        raise ConfigError(f"data.reward={spec}: {path.name} has no function '{name}'; it defines: {', '.join(found) or 'none'}")
    return fn


def resolve_reward(spec: str) -> Callable[..., list[dict[str, float]]]:
    """A plugin ``file.py:fn`` or a registered reward name (unknown names list the known ones)."""
    if is_plugin_spec(spec):
        return load_plugin(spec)
    from megatron_papo.rewards.registry import get_reward_fn

    try:
        return get_reward_fn(spec)
    except KeyError as e:
        raise ConfigError(f"data.reward={spec}: {e.args[0]}; or give a plugin path/to/file.py:fn") from None


def call_kwargs(fn: Callable[..., Any], format_weight: float) -> dict[str, Any]:
    """``{"format_weight": w}`` if ``fn`` takes it (by name or ``**kwargs``), else nothing."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.name == "format_weight" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"format_weight": format_weight}
    return {}


def check_results(out: Any, n: int) -> list[dict[str, float]]:
    """The reward function's result as ``n`` dicts of finite floats with ``overall``; ValueError otherwise."""
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{type(out).__name__} of length {len(out)}" if hasattr(out, "__len__") else type(out).__name__
        raise ValueError(f"expected a list of {n} dicts, got {got}")
    rows = []
    for i, r in enumerate(out):
        if not isinstance(r, Mapping) or "overall" not in r:
            raise ValueError(f"result {i} is not a dict with 'overall': {r!r:.200}")
        row = {}
        for k, v in r.items():
            try:
                row[str(k)] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"result {i}: '{k}' = {v!r:.100} is not a number") from None
            if not math.isfinite(row[str(k)]):
                raise ValueError(f"result {i}: '{k}' = {v!r} is not finite")
        rows.append(row)
    return rows
