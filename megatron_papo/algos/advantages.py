"""Outcome advantages from per-response scores, grouped by prompt (papo_spec §2.2).

All estimators take ``scores_B`` (one scalar score per response) and ``group_ids`` (one id per
response; responses of the same prompt share an id, in any order) and return ``adv_B``.

- ``grpo`` / ``dapo`` (identical, as in the reference code):
  ``A_i = (s_i - mean_g) / (std_g + eps)`` with the unbiased (n-1) std, eps = 1e-6.
- ``drgrpo`` (Dr. GRPO): ``A_i = s_i - mean_g`` (no std normalisation).
- ``rloo``: ``A_i = s_i - mean_{j != i in g} s_j`` (leave-one-out baseline).

Singleton groups (a prompt with one response) have no baseline: the reference code asserts
``n > 1``; here their advantage is **0** (they contribute no policy gradient), which keeps a
partially filled DAPO batch usable. Config validation already requires ``rollout.n >= 2``.
Computation is in float64; the result has the dtype of ``scores_B``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch

from megatron_papo.algos.registry import Registry
from megatron_papo.utils.logging import warn_once

GroupIds = Union[torch.Tensor, Sequence[Any]]
ADVANTAGES: Registry[Callable[..., torch.Tensor]] = Registry("advantage estimator")


def group_index(group_ids: GroupIds) -> tuple[torch.Tensor, int]:
    """Map arbitrary hashable group ids (tensor, list of str/int) to dense indices ``[0, G)``."""
    keys = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    table: dict[Any, int] = {}
    idx = [table.setdefault(k, len(table)) for k in keys]
    return torch.tensor(idx, dtype=torch.long), len(table)


def _group_sums(values_B: torch.Tensor, idx_B: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values_B.dtype).index_add_(0, idx_B, values_B)


def _group_stats(scores_B: torch.Tensor, group_ids: GroupIds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores f64, per-sample group size, per-sample group sum, per-sample group mean)."""
    s = scores_B.detach().to(torch.float64).reshape(-1).cpu()
    idx, g = group_index(group_ids)
    if idx.numel() != s.numel():
        raise ValueError(f"group_ids has {idx.numel()} entries but scores_B has {s.numel()}")
    count = _group_sums(torch.ones_like(s), idx, g)[idx]
    total = _group_sums(s, idx, g)[idx]
    if bool((count < 2).any()):
        warn_once("advantages: some prompt groups have a single response; their advantage is set to 0 (no baseline)")
    return s, count, total, total / count


@ADVANTAGES.register("grpo")
def grpo_advantages(scores_B: torch.Tensor, group_ids: GroupIds, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (s - group mean) / (unbiased group std + eps); singleton groups -> 0."""
    s, count, _, mean = _group_stats(scores_B, group_ids)
    idx, g = group_index(group_ids)
    sq = _group_sums((s - mean) ** 2, idx, g)[idx]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    adv = (s - mean) / (std + eps)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return adv.to(device=scores_B.device, dtype=scores_B.dtype)


@ADVANTAGES.register("dapo")
def dapo_advantages(scores_B: torch.Tensor, group_ids: GroupIds, *, eps: float = 1e-6) -> torch.Tensor:
    """DAPO: the same formula as GRPO (the difference is upstream group filtering, see ``dapo.py``)."""
    return grpo_advantages(scores_B, group_ids, eps=eps)


@ADVANTAGES.register("drgrpo")
def drgrpo_advantages(scores_B: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """Dr. GRPO: s - group mean (no std division); singleton groups -> 0 (automatically)."""
    s, _, _, mean = _group_stats(scores_B, group_ids)
    return (s - mean).to(device=scores_B.device, dtype=scores_B.dtype)


@ADVANTAGES.register("rloo")
def rloo_advantages(scores_B: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """RLOO: s_i minus the mean of the other responses of its group; singleton groups -> 0."""
    s, count, total, _ = _group_stats(scores_B, group_ids)
    baseline = (total - s) / (count - 1).clamp(min=1)
    adv = torch.where(count > 1, s - baseline, torch.zeros_like(s))
    return adv.to(device=scores_B.device, dtype=scores_B.dtype)


def compute_advantages(name: str, scores_B: torch.Tensor, group_ids: GroupIds, **kw: Any) -> torch.Tensor:
    """Advantages ``[B]`` by estimator ``name`` (grpo | dapo | drgrpo | rloo); extra kwargs go to it."""
    return ADVANTAGES.get(name)(scores_B, group_ids, **kw)
