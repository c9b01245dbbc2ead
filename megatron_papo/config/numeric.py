"""Range checks of the numeric knobs: every float must be finite, and each listed knob within its range.

``check_numbers(cfg)`` runs inside ``config.validate`` and raises a one-line :class:`ConfigError` naming the
field, the value and the allowed range, before any process group, model or engine starts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from megatron_papo.config.base import ConfigError

# field -> (low, high, low_open, high_open); None = unbounded on that side
RANGES: dict[str, tuple[Optional[float], Optional[float], bool, bool]] = {
    "optim.lr": (0.0, None, False, False),
    "optim.weight_decay": (0.0, None, False, False),
    "optim.adam_beta1": (0.0, 1.0, False, True),
    "optim.adam_beta2": (0.0, 1.0, False, True),
    "optim.adam_eps": (0.0, None, True, False),
    "optim.clip_grad": (0.0, None, False, False),
    "optim.max_skipped_steps": (0, None, False, False),
    "optim.rollout_batch_size": (1, None, False, False),
    "optim.global_batch_size": (1, None, False, False),
    "optim.micro_batch_size": (1, None, False, False),
    "optim.ppo_epochs": (1, None, False, False),
    "rollout.temperature": (0.0, None, False, False),
    "rollout.top_p": (0.0, 1.0, True, False),
    "rollout.max_new_tokens": (1, None, False, False),
    "rollout.bucket_mb": (1, None, False, False),
    "rollout.timeout_s": (0.0, None, True, False),
    "rollout.start_timeout_s": (0.0, None, True, False),
    "rollout.engine_tp": (1, None, False, False),
    "algo.clip_ratio_low": (0.0, None, False, False),
    "algo.clip_ratio_high": (0.0, None, False, False),
    "algo.clip_ratio_dual": (1.0, None, False, False),
    "algo.kl_coef": (0.0, None, False, False),
    "algo.kl_prcp_coef": (0.0, None, False, False),
    "data.format_weight": (0.0, 1.0, False, False),
    "checkpoint.save_every": (0, None, False, False),
    "checkpoint.keep_last": (0, None, False, False),
    "checkpoint.hf_every": (0, None, False, False),
    "checkpoint.preempt_timeout_s": (0.0, None, True, False),
    "total_steps": (0, None, False, False),
    "eval_every": (0, None, False, False),
    "eval_n": (1, None, False, False),
    "eval_temperature": (0.0, None, False, False),
}


def _numbers(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from _numbers(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, v


def _interval(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open or lo is None else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}" \
           f"{')' if hi_open or hi is None else ']'}"


def check_numbers(cfg: Any) -> None:
    """Raise ConfigError for a non-finite float anywhere in ``cfg`` or a listed knob outside its range."""
    for key, v in _numbers(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v} is not a finite number; set a finite value")
        rng = RANGES.get(key)
        if rng is None:
            continue
        lo, hi, lo_open, hi_open = rng
        bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi)))
        if bad:
            raise ConfigError(f"{key}={v} is out of range; expected a value in {_interval(lo, hi, lo_open, hi_open)}")
