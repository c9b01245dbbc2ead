"""DAPO pieces: dynamic sampling (group filter + batch filling) and the soft overlong punishment.

Dynamic sampling (papo_spec §1 step 5, §6.2): a group (the n responses of one prompt) is kept
when its mean accuracy is strictly inside ``(low, high)`` = (0.01, 0.99) -- all-correct and
all-wrong groups have zero GRPO advantage and no learning signal. The driver draws prompts
again until ``target_groups`` groups survive, at most ``max_tries`` draws (reference: 20;
``<= 0`` = unlimited), then truncates to exactly ``target_groups``. At the limit the reference
raises; ``on_limit="warn"`` instead logs a warning and returns the partial batch.

The filter reads one reward component (``algo.dynamic_sampling_key``), like EasyR1's
``algorithm.filter_key``: the reference YAML says ``overall``, PAPO's DAPO scripts override it to ``accuracy``.

Soft overlong punishment (DAPO paper, Yu et al. 2025, eq. 13; not used by PAPO's scripts, off by default):
with ``L_max`` the response-length limit and ``L_cache`` the buffer, a response of ``|y|`` tokens gets
``R_length = 0`` if ``|y| <= L_max - L_cache``, ``((L_max - L_cache) - |y|) / L_cache`` if
``L_max - L_cache < |y| <= L_max``, and ``-1`` beyond ``L_max``, times a penalty factor (EasyR1's
``overlong_penalty_factor``; 1 in the paper); it is added to the score before advantages. The trainer applies
it after the filter, so the filter reads the reward components as the reward function returned them (in EasyR1's
DAPO reward function the punishment is part of ``overall``, which only matters when filtering on ``overall``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Generic, Optional, TypeVar

import torch

from megatron_papo.algos.advantages import GroupIds, group_index
from megatron_papo.utils.logging import get_logger

T = TypeVar("T")


def keep_group(mean_accuracy: float, low: float = 0.01, high: float = 0.99) -> bool:
    """True when a group's mean accuracy is strictly inside ``(low, high)``."""
    return low < mean_accuracy < high


def group_mean(rewards: Sequence[Mapping[str, float]], key: str) -> float:
    """Mean of reward component ``key`` (``accuracy``, ``overall``, ``format``...) over a group's responses."""
    if not rewards:
        raise ValueError("group_mean: a group without rewards")
    missing = [i for i, r in enumerate(rewards) if key not in r]
    if missing:
        raise KeyError(f"reward component {key!r} is not in the rewards (they have {sorted(rewards[missing[0]])}); "
                       "set algo.dynamic_sampling_key to one of those")
    return sum(float(r[key]) for r in rewards) / len(rewards)


def keep_groups(group_accuracies: Sequence[float], low: float = 0.01, high: float = 0.99) -> list[bool]:
    """:func:`keep_group` for each per-group mean accuracy."""
    return [keep_group(float(a), low, high) for a in group_accuracies]


def keep_mask(accuracy_B: torch.Tensor, group_ids: GroupIds, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Per-response bool mask ``[B]``: True for responses whose group passes the filter."""
    acc = accuracy_B.detach().to(torch.float64).reshape(-1).cpu()
    idx, g = group_index(group_ids)
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, idx, acc)
    counts = torch.zeros(g, dtype=torch.float64).index_add_(0, idx, torch.ones_like(acc))
    means = sums / counts
    return ((means > low) & (means < high))[idx]


@dataclass
class FillResult(Generic[T]):
    """Outcome of :func:`fill_batch`: exactly ``target`` groups unless ``full`` is False."""

    groups: list[T]
    tries: int
    drawn: int
    kept: int
    full: bool
    kept_per_try: list[int] = field(default_factory=list)


def fill_batch(draw_fn: Callable[[], Sequence[T]], target_groups: int, max_tries: int, *,
               keep_fn: Optional[Callable[[T], bool]] = None, on_limit: str = "raise") -> FillResult[T]:
    """Call ``draw_fn`` (one draw of groups) until ``target_groups`` groups pass ``keep_fn``.

    ``keep_fn`` None keeps every group (``draw_fn`` already filtered). Returns the first
    ``target_groups`` kept groups in draw order. At ``max_tries`` draws (``<= 0``: unlimited)
    without a full batch: ``on_limit="raise"`` raises RuntimeError, ``"warn"`` logs and returns the
    partial batch (still raises if nothing at all was kept).
    """
    if target_groups < 1:
        raise ValueError(f"target_groups must be >= 1, got {target_groups}")
    if on_limit not in ("raise", "warn"):
        raise ValueError(f"on_limit must be 'raise' or 'warn', got {on_limit!r}")
    kept: list[T] = []
    tries = drawn = 0
    per_try: list[int] = []
    while len(kept) < target_groups:
        if 0 < max_tries <= tries:
            msg = (f"DAPO dynamic sampling: only {len(kept)}/{target_groups} groups passed the filter after "
                   f"{tries} draws ({drawn} groups drawn, kept per draw {per_try}); raise "
                   f"algo.dynamic_sampling_max_tries, widen (low, high), or set algo.dynamic_sampling_on_limit=warn")
            if on_limit == "raise" or not kept:
                raise RuntimeError(msg)
            get_logger("algos.dapo").warning(msg + "; training on the partial batch")
            return FillResult(kept, tries, drawn, len(kept), False, per_try)
        batch = list(draw_fn())
        tries += 1
        drawn += len(batch)
        new = [g for g in batch if keep_fn is None or keep_fn(g)]
        per_try.append(len(new))
        kept.extend(new)
    return FillResult(kept[:target_groups], tries, drawn, len(kept), True, per_try)


def overlong_penalty(lengths_B: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """Soft overlong punishment ``[B]`` (<= 0, float32) to add to scores; zeros when ``buffer <= 0``."""
    lengths = lengths_B.detach().to(torch.float32)
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_len:
        raise ValueError(f"overlong buffer ({buffer}) must not exceed the max response length ({max_len})")
    expected = max_len - buffer
    return ((expected - lengths) / buffer * penalty).clamp(min=-penalty, max=0.0)


def apply_overlong_penalty(scores_B: torch.Tensor, lengths_B: torch.Tensor, max_len: int, buffer: int,
                           penalty: float = 1.0) -> tuple[torch.Tensor, float]:
    """Scores with the soft overlong punishment added, and the fraction of responses it penalised (``[B]`` each
    in; ``buffer <= 0`` returns the scores unchanged and 0)."""
    pen = overlong_penalty(lengths_B, max_len, buffer, penalty).to(scores_B.device)
    return scores_B + pen.to(scores_B.dtype), float((pen < 0).float().mean()) if pen.numel() else 0.0
