"""The rollout phase's per-engine pieces: one engine's block of prompts -> scored responses, and groups on every rank.

:class:`~megatron_papo.rollout.fleet.RolloutFleet` decides which engine gets which prompts and gathers the
results; here is what runs for one block on the engine's owner (:func:`generate_block`: generation and
rewards) and what every rank builds from the gathered results (:func:`assemble_group`: the masked view).
Every random choice is seeded by (seed, step, prompt uid, sample index), which makes a resumed run repeat an
uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

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
    engine: int = 0  #: index of the fleet engine that generated the responses

    @property
    def scores(self) -> list[float]:
        return [r["overall"] for r in self.rewards]

    @property
    def mean_accuracy(self) -> float:
        return sum(r.get("accuracy", 0.0) for r in self.rewards) / max(1, len(self.rewards))


def make_engine(rollout_cfg: Any, hf_dir: str, base_gpu_id: Optional[int] = None) -> Any:
    """The configured rollout engine for an HF checkpoint directory (not started); ``base_gpu_id`` (a fleet
    engine's first GPU) replaces ``rollout.engine_base_gpu``."""
    if base_gpu_id is not None:
        import dataclasses

        rollout_cfg = dataclasses.replace(rollout_cfg, engine_base_gpu=base_gpu_id)
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


Scored = tuple[list[list[int]], list[list[float]], list[str], list[str], list[dict[str, float]]]


def generate_block(engine: Any, samples: list[PromptSample], *, n: int, sampling: dict[str, Any], step: int, seed: int,
                   tokenizer: Any, reward_fn: Callable) -> list[Scored]:
    """On an engine's owner: n responses for each prompt of its block, decoded and scored.

    Returns one ``(response_ids, engine_logprobs, finish_reasons, texts, rewards)`` per prompt, in order.
    """
    seeds = [[sample_seed(seed, step, s.uid, k) for k in range(n)] for s in samples]
    outs = engine.generate([(s.prompt, s.images) for s in samples], n=n, sampling=sampling, seeds=seeds)
    scored: list[Scored] = []
    for s, res in zip(samples, outs):
        ids = [list(r.token_ids) for r in res]
        texts = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        rewards = score(reward_fn, texts, [s.answer] * len(texts), [f"step{step}/uid{s.uid}/{k}" for k in range(len(texts))])
        scored.append((ids, [list(r.logprobs) for r in res], [r.finish_reason for r in res], texts, rewards))
    return scored


def assemble_group(sample: PromptSample, scored: Scored, *, engine: int, step: int, seed: int, data_cfg: Any,
                   processor: Any, make_aug: bool) -> Group:
    """On every rank: the Group of one prompt from its gathered results (plus its masked view when PAPO is on)."""
    ids, lps, fins, texts, rewards = scored
    aug = make_masked_view(sample, data_cfg, seed, step, processor) if make_aug else None
    return Group(sample=sample, aug_pixel_values=aug, response_ids=ids, engine_logprobs=lps, finish_reasons=fins,
                 texts=texts, rewards=rewards, engine=engine)


def engine_logprobs_BS(groups: list[Group], prompt_lens: Any, shape: Any, rows: Optional[list[int]] = None) -> torch.Tensor:
    """The engines' log-probs of the sampled response tokens in the trainer's per-token layout ``[B, S]`` (host,
    float32): row r's i-th response token, at position ``p_r + i`` of its sequence, is predicted at position
    ``p_r - 1 + i`` (where ``old_logprob`` holds it); zeros elsewhere and on rows not in ``rows`` (None = all)."""
    out = torch.zeros(tuple(shape), dtype=torch.float32)
    per_row = [lp for gr in groups for lp in gr.engine_logprobs]
    for r in range(len(per_row)) if rows is None else rows:
        lp = torch.tensor(per_row[r], dtype=torch.float32)
        p = int(prompt_lens[r])
        out[r, p - 1:p - 1 + lp.numel()] = lp
    return out


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
