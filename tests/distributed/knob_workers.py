"""Workers for tests/distributed/test_training_knobs.py: config knobs that must reach the code they name.

* ``chunked_kernel_equals_unchunked``: ``model.logits_chunk_size`` reaches ``token_stats`` through the actor (block
  sizes counted), and a chunked actor gives the unchunked one's log-probs, loss and gradients.
* ``trainer_knobs``: two RL steps of the real ``Trainer`` on the tiny model with a scripted engine (hand-chosen
  responses and rewards) covering ``algo.dynamic_sampling_key``, ``algo.overlong_buffer``/``overlong_penalty`` and
  ``model.freeze_vision_tower`` with ``rollout.skip_frozen``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _batch(hf_dir: str, cfg: Any) -> Any:
    from transformers import AutoProcessor

    from megatron_papo.data.collate import collate_rollouts, repeat_interleave
    from megatron_papo.data.dataset import load_prompt_dataset

    proc = AutoProcessor.from_pretrained(hf_dir)
    ds = load_prompt_dataset("synthetic", cfg.data, proc, "train")
    samples = repeat_interleave([ds.encode(0), ds.encode(1), ds.encode(2)], 4)
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 30, 3, 7, 2, 11, 5, 9, 4, 10, 6, 8]
    responses = [torch.randint(10, 200, (n,), generator=gen).tolist() for n in lengths]
    batch = collate_rollouts(samples, responses, proc.tokenizer.pad_token_id,
                             aug_pixel_values=[s.pixel_values.flip(0) for s in samples])
    batch.images_per_row = [int(s.image_grid_thw.shape[0]) for s in samples]
    return batch


def chunked_kernel_equals_unchunked(hf_dir: str, chunk: int) -> dict[str, Any]:
    """The same stats pass and PAPO update (paired live views, exact KL and entropies: every kernel output and both
    gradients) with ``model.logits_chunk_size`` = 0 and = ``chunk``; the kernel's work blocks are recorded."""
    import megatron_papo.ops.vocab_parallel as vp
    from megatron_papo.actor import PolicyModel, StatsRequest, make_micro_batches
    from megatron_papo.algos import LossSpec
    from megatron_papo.config import load_config
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings

    cfg = load_config("tiny_cpu", ["data.synthetic_train_size=8"])
    groups = init_distributed(cfg.parallel, seed=3)
    batch = _batch(hf_dir, cfg)
    rows = list(range(12))
    spec = LossSpec(agg_mode="token_mean", kl_coef=0.01, use_kl_prcp=True, kl_prcp_coef=0.02, kl_prcp_estimator="exact",
                    aug_mode="live", entropy_estimator="exact", ori_entropy_coef=0.01, aug_entropy_coef=0.01)
    blocks: list[tuple[int, int]] = []  # (tokens in the call, rows per block) of every kernel pass
    orig_chunks = vp._chunks

    def counting_chunks(n: int, rows_per_block: int) -> list[tuple[int, int]]:
        blocks.append((n, rows_per_block))
        return orig_chunks(n, rows_per_block)

    vp._chunks = counting_chunks
    out: dict[str, Any] = {}
    for size in (0, chunk):
        blocks.clear()
        actor = PolicyModel(dataclasses.replace(cfg.model, logits_chunk_size=size), groups, hf_dir, trainable=True,
                            optim=OptimSettings(lr=1e-2, clip_grad=1e9))
        mbs = make_micro_batches(batch, rows, 6, with_aug=True)
        stats = actor.token_stats(mbs, StatsRequest("ori", entropy=True), 1.0)
        old = torch.zeros(batch.input_ids.shape)
        ent = torch.zeros(batch.input_ids.shape)
        for mb, r in zip(mbs, stats):
            old[mb["rows"], : r["logprob"].shape[1]] = r["logprob"]
            ent[mb["rows"], : r["entropy"].shape[1]] = r["entropy"]
        extra = {"old_logprob": old, "ref_logprob": old - 0.01, "advantages": torch.linspace(-1.0, 1.0, len(rows))}
        mbs = make_micro_batches(batch, rows, 6, extra=extra, with_aug=True)
        res = actor.train_mini_batch(mbs, spec, temperature=1.0, global_tokens=float(batch.label_mask.sum()),
                                     global_seqs=float(len(rows)), paired=True, want_exact=True)
        grads = torch.cat([p.main_grad.detach().reshape(-1).clone() for p in actor.modules[0].parameters()])
        out[size] = {"old": old, "ent": ent, "loss": res["loss/total"], "grad_norm": res["grad_norm"], "grads": grads,
                     "blocks": list(blocks), "kl": res.get("kl/prcp", 0.0)}
    vp._chunks = orig_chunks
    a, b = out[0], out[chunk]
    return {
        "unchunked_blocks": a["blocks"], "chunked_blocks": b["blocks"],
        "logprob_diff": float((a["old"] - b["old"]).abs().max()), "entropy_diff": float((a["ent"] - b["ent"]).abs().max()),
        "entropy_max": float(a["ent"].abs().max()),
        "loss": (a["loss"], b["loss"]), "grad_norm": (a["grad_norm"], b["grad_norm"]),
        "grad_diff": float((a["grads"] - b["grads"]).abs().max()), "grad_max": float(a["grads"].abs().max()),
    }


# ---------------------------------------------------------------------------------------------- trainer knobs
# Rewards of the scripted groups of every draw (4 prompts x 4 responses): (accuracy, format) per response.
# The filter keeps a group when its mean is strictly inside (0.01, 0.99): by accuracy it keeps groups 1 and 3, by
# format groups 0 and 3, so the two keys train on different data.
DRAW_PLAN = [
    ([1, 1, 1, 1], [1, 0, 1, 0]),  # accuracy 1.0 (dropped by accuracy), format 0.5
    ([1, 0, 1, 0], [1, 1, 1, 1]),  # accuracy 0.5, format 1.0 (dropped by format)
    ([0, 0, 0, 0], [0, 0, 0, 0]),  # dropped by both
    ([1, 0, 0, 0], [1, 0, 0, 0]),  # kept by both
]
RESPONSE_LENGTHS = [1, 2, 3, 4]  # response k of every group; rollout.max_new_tokens = 4


class ScriptedEngine:
    """A rollout engine with the protocol of ``rollout/base.py`` that answers every prompt with responses of
    ``RESPONSE_LENGTHS`` tokens and records each weight update's HF names (no model: a trainer-wiring test)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.updates: list[list[str]] = []

    def generate(self, requests: Any, n: int = 1, sampling: Any = None, seeds: Any = None) -> list[list[Any]]:
        from megatron_papo.rollout.base import GenerationResult

        assert n == len(RESPONSE_LENGTHS)
        return [[GenerationResult(token_ids=self.token_ids[:k], logprobs=[-1.0] * k,
                                  finish_reason="length" if k == RESPONSE_LENGTHS[-1] else "stop")
                 for k in RESPONSE_LENGTHS] for _ in requests]

    def update_weights(self, named_tensors: Any, **_: Any) -> None:
        names: list[str] = []
        for item in named_tensors:
            names += [n for n, _ in item] if isinstance(item, list) else [item[0]]
        self.updates.append(names)

    def release_memory(self) -> None: ...

    def resume_memory(self) -> None: ...

    def shutdown(self) -> None: ...


def _scripted_rewards() -> Any:
    calls = [0]

    def reward_fn(texts: list[str], answers: list[str]) -> list[dict[str, float]]:
        acc, fmt = DRAW_PLAN[calls[0] % len(DRAW_PLAN)]
        calls[0] += 1
        assert len(texts) == len(acc)
        return [{"overall": 0.9 * a + 0.1 * f, "accuracy": float(a), "format": float(f)} for a, f in zip(acc, fmt)]

    return reward_fn


def trainer_knobs(hf_dir: str, run_dir: str, overrides: list[str]) -> dict[str, Any]:
    """Two ``Trainer.train_step`` calls (tiny_cpu + ``overrides``) with the scripted engine and rewards; returns the
    scores handed to the advantage estimator, the step metrics, which weights changed, and the synced names."""
    import megatron_papo.trainer as trainer_mod
    from megatron_papo.actor import make_micro_batches
    from megatron_papo.config import load_config
    from megatron_papo.models.qwen2_5_vl import forward_logits
    from megatron_papo.parallel import init_distributed

    cfg = load_config("tiny_cpu", [f"run_dir={run_dir}", *overrides])
    groups = init_distributed(cfg.parallel, seed=cfg.seed)
    scores: list[list[float]] = []
    orig_adv = trainer_mod.compute_advantages

    def recording_advantages(name: str, scores_B: torch.Tensor, index: Any) -> torch.Tensor:
        scores.append(scores_B.tolist())
        return orig_adv(name, scores_B, index)

    trainer_mod.compute_advantages = recording_advantages
    engine: list[ScriptedEngine] = []

    def factory(c: Any, d: str, slot: Any = None) -> ScriptedEngine:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(d)
        ids = tok.encode(" red green blue yellow shape", add_special_tokens=False)
        engine.append(ScriptedEngine(ids))
        return engine[0]

    trainer = trainer_mod.Trainer(cfg, groups, hf_dir, engine_factory=factory)
    trainer.reward_fn = _scripted_rewards()
    model = trainer.actor.modules[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = [trainer.train_step(step) for step in (1, 2)]
    after = dict(model.named_parameters())
    vision = [n for n in before if n.startswith("vision.")]
    lm = [n for n in before if not n.startswith("vision.")]
    out: dict[str, Any] = {
        "scores": scores, "metrics": metrics, "vision_params": len(vision), "lm_params": len(lm),
        "vision_requires_grad": sorted({bool(after[n].requires_grad) for n in vision}),
        "vision_changed": [n for n in vision if not torch.equal(before[n], after[n].detach())],
        "lm_unchanged": [n for n in lm if torch.equal(before[n], after[n].detach())],
        "updates": engine[0].updates if engine else [],
    }
    # The tower is not frozen by accident of the data: made trainable, it gets gradients from this model's logits.
    if cfg.model.freeze_vision_tower:
        batch = _batch(hf_dir, cfg)
        (mb,) = make_micro_batches(batch, list(range(12)), 12)
        for n in vision:
            after[n].requires_grad_(True)
            after[n].grad = None
        forward_logits(model, mb).float().logsumexp(-1).sum().backward()
        out["vision_grad_if_trainable"] = max(float(after[n].grad.abs().max()) for n in vision if after[n].grad is not None)
        for n in vision:
            after[n].requires_grad_(False)
    trainer_mod.compute_advantages = orig_adv
    trainer.close()
    return out
