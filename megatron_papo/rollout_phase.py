"""The rollout phase of a training step: masked views, generation, rewards, DAPO filtering.

Generation happens on global rank 0 (which owns the engine); the resulting groups are broadcast to
every rank, so all ranks build identical batches. Every random choice is seeded by
(seed, step, prompt uid, sample index), which makes a resumed run repeat an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_papo.data.processing import PromptSample, make_masked_view
from megatron_papo.rewards import score


@dataclass
class Group:
    """One prompt and its n responses (all ranks hold identical copies)."""

    sample: PromptSample
    aug_pixel_values: Optional[torch.Tensor]
    response_ids: list[list[int]]
    engine_logprobs: list[list[float]]
    finish_reasons: list[str]
    texts: list[str] = field(default_factory=list)
    rewards: list[dict[str, float]] = field(default_factory=list)

    @property
    def scores(self) -> list[float]:
        return [r["overall"] for r in self.rewards]

    @property
    def mean_accuracy(self) -> float:
        return sum(r.get("accuracy", 0.0) for r in self.rewards) / max(1, len(self.rewards))


def make_engine(rollout_cfg: Any, hf_dir: str) -> Any:
    """The configured rollout engine for an HF checkpoint directory (not started)."""
    if rollout_cfg.engine == "sglang":
        from megatron_papo.rollout.sglang_engine import SGLangEngine

        return SGLangEngine.from_config(rollout_cfg, hf_dir)
    if rollout_cfg.engine == "vllm":
        from megatron_papo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine.from_config(rollout_cfg, hf_dir)
    raise ValueError(f"unknown rollout.engine '{rollout_cfg.engine}'; known: sglang, vllm")


def sample_seed(seed: int, step: int, uid: int, k: int) -> int:
    """A 31-bit sampling seed for response k of prompt uid at this step."""
    return (seed * 1_000_003 + step * 10_007 + uid * 101 + k) % (2**31 - 1)


def generate_groups(engine: Any, samples: list[PromptSample], *, n: int, sampling: dict[str, Any], step: int, seed: int,
                    tokenizer: Any, reward_fn: Callable, data_cfg: Any, processor: Any, make_aug: bool,
                    src_rank: int = 0) -> list[Group]:
    """Generate n responses per prompt on rank ``src_rank``, score them, broadcast the groups to all ranks."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    payload: list[Any] = [None]
    if rank == src_rank:
        seeds = [[sample_seed(seed, step, s.uid, k) for k in range(n)] for s in samples]
        outs = engine.generate([(s.prompt, s.images) for s in samples], n=n, sampling=sampling, seeds=seeds)
        groups = []
        for s, res in zip(samples, outs):
            ids = [list(r.token_ids) for r in res]
            texts = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
            rewards = score(reward_fn, texts, [s.answer] * len(texts), [f"step{step}/uid{s.uid}/{k}" for k in range(len(texts))])
            groups.append(Group(sample=s, aug_pixel_values=None, response_ids=ids,
                                engine_logprobs=[list(r.logprobs) for r in res],
                                finish_reasons=[r.finish_reason for r in res], texts=texts, rewards=rewards))
        payload = [[(g.response_ids, g.engine_logprobs, g.finish_reasons, g.texts, g.rewards) for g in groups]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=src_rank)
    groups = []
    for s, (ids, lps, fins, texts, rewards) in zip(samples, payload[0]):
        aug = make_masked_view(s, data_cfg, seed, step, processor) if make_aug else None
        groups.append(Group(sample=s, aug_pixel_values=aug, response_ids=ids, engine_logprobs=lps,
                            finish_reasons=fins, texts=texts, rewards=rewards))
    return groups


def rollout_metrics(groups: list[Group], max_new_tokens: int) -> dict[str, float]:
    """Reward, accuracy, format and length statistics of a batch of groups."""
    rewards = [r for g in groups for r in g.rewards]
    lens = [len(i) for g in groups for i in g.response_ids]
    n = max(1, len(rewards))
    solved = [g for g in groups if g.mean_accuracy > 0.99]
    return {
        "reward/mean": sum(r["overall"] for r in rewards) / n,
        "reward/accuracy": sum(r.get("accuracy", 0.0) for r in rewards) / n,
        "reward/format": sum(r.get("format", 0.0) for r in rewards) / n,
        "response/length_mean": sum(lens) / max(1, len(lens)),
        "response/clip_ratio": sum(1 for g in groups for f in g.finish_reasons if f == "length") / max(1, len(lens)),
        "rollout/groups_all_correct": len(solved) / max(1, len(groups)),
        "rollout/groups_zero_std": sum(1 for g in groups if len(set(g.scores)) == 1) / max(1, len(groups)),
        "reward/failed": float(sum(r.get("reward_failed", 0.0) for r in rewards)),  # scored 0 (rewards/pool.py)
    }
