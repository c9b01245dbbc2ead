"""The RL step: rollout -> rewards -> log-probs (old, masked, reference) -> advantages -> update -> sync.

One ``Trainer`` per process. Generation is the rollout fleet's (``rollout/fleet.py``): one engine per
``rollout.engine_tp`` ranks on the trainer's devices (``rollout.placement=colocated``: on GPUs the engines
release their memory while the actor trains, and the reference can live in host memory between its passes)
or engines with devices of their own (``separate``: weights travel through one process group or disk). The
fleet returns the same groups, in the same order, on every rank; each rank takes its data-parallel share of
rows and runs the actor/reference through mcore's schedule (TP/PP/DP). Global rank 0 owns the metric sinks.

With ``rollout.async_steps=1`` (separate engines) step k trains on groups generated during step k-1 while the
fleet generates step k+1's (``rollout/async_rollout.py``); they are collected and the weights synced at the end of
the step, and a checkpoint keeps them (with the data position from before they were drawn).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_papo.actor import PolicyModel, StatsRequest, gather_token_stats, make_micro_batches
from megatron_papo.algos import LossSpec, compute_advantages
from megatron_papo.algos.dapo import apply_overlong_penalty, fill_batch, group_mean, keep_group
from megatron_papo.checkpoint.dist import AsyncSaves, clean_stale, find_resumable, load_checkpoint, save_checkpoint
from megatron_papo.checkpoint.hf_export import HFExports
from megatron_papo.collapse import CollapseDetector
from megatron_papo.config import Config
from megatron_papo.data.collate import collate_rollouts, repeat_interleave
from megatron_papo.data.dataset import PromptLoader, load_prompt_dataset
from megatron_papo.errors import CheckpointError
from megatron_papo.invariants import InvariantChecker, InvariantError  # noqa: F401  (InvariantError: re-export)
from megatron_papo.nonfinite import SkippedSteps
from megatron_papo.parallel import ParallelGroups
from megatron_papo.parallel.training import OptimSettings, build_lr_scheduler, current_lr
from megatron_papo.preemption import Preemption
from megatron_papo.rewards import build_reward_fn
from megatron_papo.rollout.async_rollout import AsyncRollout, groups_from_state, groups_state
from megatron_papo.rollout.fleet import RolloutFleet
from megatron_papo.rollout.weight_sync import SyncState
from megatron_papo.rollout_phase import Group, engine_logprobs_BS, rollout_metrics
from megatron_papo.utils.logging import get_logger, progress
from megatron_papo.utils.metrics import MetricsWriter

log = get_logger("trainer")


def engine_banned_ids(hf_dir: str, tokenizer: Any) -> list[int]:
    """The ids the rollout engine never samples (same rule as the engine: specials except EOS, unused rows)."""
    from transformers import AutoConfig, GenerationConfig

    from megatron_papo.rollout.tokens import banned_token_ids, eos_token_ids

    cfg = AutoConfig.from_pretrained(hf_dir)
    vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None)
    try:
        gen_eos = GenerationConfig.from_pretrained(hf_dir).eos_token_id
    except OSError:
        gen_eos = None
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    return banned_token_ids(tokenizer, vocab, allowed=eos_token_ids(tokenizer, gen_eos))


@dataclass
class Ahead:
    """Groups generated one step ahead (``rollout.async_steps=1``) for ``step``, and the data-loader position from
    before their prompts were drawn (what a checkpoint saves, so that a resume draws them again)."""

    step: int
    groups: list[Group]
    loader_before: dict[str, Any]


class Trainer:
    """Builds every part from the config and runs ``total_steps`` RL steps (resumable)."""

    #: set by ``train.main`` before :meth:`run`: checked between steps (save, then exit 128+signal)
    preemption: Optional[Preemption] = None

    def __init__(self, cfg: Config, groups: ParallelGroups, hf_dir: str, engine_factory: Any = None) -> None:
        from transformers import AutoProcessor

        self.cfg, self.groups, self.hf_dir = cfg, groups, hf_dir
        self.run_dir = Path(cfg.run_dir)
        self.is_rank0 = groups.rank == 0
        self.processor = AutoProcessor.from_pretrained(hf_dir)
        self.tokenizer = self.processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        self.train_ds = load_prompt_dataset(cfg.data.train, cfg.data, self.processor, "train")
        self.loader = PromptLoader(self.train_ds, batch_size=cfg.optim.rollout_batch_size, seed=cfg.data.seed)
        self.reward_fn = build_reward_fn(cfg.data)  # worker pool, per-call timeout; failures score 0
        o = cfg.optim
        settings = OptimSettings(lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
                                 adam_eps=o.adam_eps, clip_grad=o.clip_grad, use_distributed_optimizer=o.use_distributed_optimizer,
                                 cpu_offload_fraction=o.cpu_offload_fraction,
                                 bf16=self._dtype() == torch.bfloat16)
        sp = cfg.parallel.sequence_parallel
        banned = engine_banned_ids(hf_dir, self.tokenizer)
        self.actor = PolicyModel(cfg.model, groups, hf_dir, sequence_parallel=sp, trainable=True, optim=settings, banned_ids=banned)
        self.lr_scheduler = self._build_lr_scheduler()
        from megatron_papo.evaluate import Validator

        self.validator = Validator(cfg, self.processor, self.reward_fn)
        self.ref = (PolicyModel(cfg.model, groups, hf_dir, sequence_parallel=sp, trainable=False, banned_ids=banned)
                    if cfg.algo.use_ref else None)
        self.papo = cfg.algo.kl_prcp_coef > 0 or cfg.algo.aug_entropy_coef > 0
        self.invariants = InvariantChecker.for_dtype(cfg.check_invariants, self._dtype(), fp8=cfg.model.fp8 is not None,
                                                     override=cfg.check_invariants_tol)
        self.fleet = RolloutFleet.build(cfg, groups, hf_dir, engine_factory)  # engines start on their owners
        self.async_rollout = AsyncRollout(self.fleet) if cfg.rollout.async_steps else None
        self._ahead: Optional[Ahead] = None  # async: the next step's groups (collected, or restored from a checkpoint)
        self._sync_state = SyncState() if cfg.rollout.skip_frozen else None
        self.step = 0
        self.skipped_updates = 0
        self.skip_guard = SkippedSteps(cfg.optim.max_skipped_steps)
        self._saved_step = 0
        ck = cfg.checkpoint
        self.async_saves = AsyncSaves() if ck.async_save else None  # dist-checkpoints written in the background
        self.hf_exports = HFExports(self.run_dir / "hf", hf_dir, self._dtype(), ck.keep_last) if ck.hf_every else None
        resume = self._maybe_resume()
        initialised = resume is None and bool(cfg.checkpoint.init_from)
        if initialised:
            self._init_from(cfg.checkpoint.init_from)
        self._offload_ref = bool(self.ref is not None and cfg.model.offload_ref and groups.device.type == "cuda")
        if self._offload_ref:
            self.ref.move_to(torch.device("cpu"))
        self.metrics = MetricsWriter.from_config(cfg, enabled=self.is_rank0, resume_step=resume)
        if resume is not None or initialised:
            self.sync_weights()  # the engine loaded the HF dir; it must serve the checkpoint's weights

    def _dtype(self) -> torch.dtype:
        from megatron_papo.models.qwen2_5_vl import resolve_dtype

        return resolve_dtype(self.cfg.model.dtype, self.groups.device)

    def _build_lr_scheduler(self) -> Any:
        from megatron_papo.config.optim import lr_schedule_steps

        o = self.cfg.optim
        warmup, decay = lr_schedule_steps(o, self.cfg.total_steps)
        return build_lr_scheduler(self.actor.optimizer, lr=o.lr, min_lr=o.min_lr, warmup_steps=warmup, decay_steps=decay,
                                  decay_style=o.lr_decay, weight_decay=o.weight_decay)

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _maybe_resume(self) -> Optional[int]:
        if self.is_rank0:
            clean_stale(self.ckpt_root)
        if self.cfg.checkpoint.resume != "auto":
            return None
        path = self._resumable()
        if path is None:
            return None
        state = load_checkpoint(path, self.actor.chunks, self.actor.optimizer)
        self.step = self._saved_step = int(state["step"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.skip_guard.consecutive = int(state.get("skipped_consecutive", 0))
        self.loader.load_state_dict(state["loader"])
        if "async_rollouts" in state and self.async_rollout is not None:
            self._ahead = self._restore_ahead(state)
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.validator.load_state_dict(state.get("eval", {}))
        log.info("resumed from %s (step %d)", path, self.step)
        return self.step

    def _restore_ahead(self, state: dict[str, Any]) -> Ahead:
        """The groups a checkpoint kept for the next step: their prompts drawn again from the saved (pre-draw) loader
        position, their engine outputs and rewards from the checkpoint, their masked views from the same seeds.
        (Without ``async_steps`` the saved position simply draws the same prompts again and generates on-policy.)"""
        saved = state["async_rollouts"]
        before = self.loader.state_dict()
        samples = self.loader.next_batch()
        groups = groups_from_state(saved["groups"], samples, step=int(saved["step"]), seed=self.cfg.seed,
                                   data_cfg=self.cfg.data, processor=self.processor, make_aug=self.papo)
        log.info("resumed the %d rollout groups of step %d generated one step ahead", len(groups), saved["step"])
        return Ahead(int(saved["step"]), groups, before)

    def _init_from(self, ckpt: str) -> None:
        """A new run from a dist-checkpoint's weights: actor and reference (the initial policy) both load it."""
        path = self.actor.load_weights(ckpt)
        if self.ref is not None:
            self.ref.load_weights(ckpt)
        log.info("initialised actor%s from %s (optimizer and step start fresh)", " and reference" if self.ref else "", path)

    def _resumable(self) -> Optional[Path]:
        """Rank 0 picks the newest valid checkpoint (falling back past broken ones) and tells every rank."""
        choice: list[Any] = [None]
        if self.is_rank0:
            try:
                choice = [find_resumable(self.ckpt_root)]
            except CheckpointError as e:
                choice = [e]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], CheckpointError):
            raise choice[0]
        return choice[0]

    def save(self) -> None:
        """Collective: checkpoint the current step (refused, with an error logged, if a weight is non-finite)."""
        state = {"loader": self.loader.state_dict(), "skipped_updates": self.skipped_updates,
                 "skipped_consecutive": self.skip_guard.consecutive,
                 "lr_scheduler": self.lr_scheduler.state_dict(), "eval": self.validator.state_dict()}
        if self._ahead is not None:  # async: the next step's rollouts, and the data position from before their draw
            state["loader"] = self._ahead.loader_before
            state["async_rollouts"] = {"step": self._ahead.step, "groups": groups_state(self._ahead.groups)}
        ck = self.cfg.checkpoint
        if self.async_saves is not None and self.hf_exports is not None:
            self.hf_exports.wait()  # the async save forks its writers: no export thread may be mid-write then
        if save_checkpoint(self.ckpt_root, self.step, self.actor.chunks, self.actor.optimizer, trainer_state=state,
                           keep_last=ck.keep_last, verify=ck.verify, async_saves=self.async_saves) is not None:
            self._saved_step = self.step  # (async: published by finish_writes or a later poll; a crash keeps 'latest')

    def export_hf(self) -> None:
        """Collective: HF export of the actor to ``<run_dir>/hf/step_XXXXXX`` (training waits for the gather only)."""
        paused = self.hf_exports.export(self.step, self.actor.chunks, self.groups)
        log.info("step %d: HF export gathered in %.2f s, writing in the background", self.step, paused)

    def finish_writes(self) -> None:
        """Collective: publish the async save in flight and wait for the HF export being written."""
        if self.async_saves is not None:
            self.async_saves.wait()
        if self.hf_exports is not None:
            self.hf_exports.wait()

    # ------------------------------------------------------------------ weight sync
    def sync_weights(self) -> dict[str, float]:
        """Push the actor's weights into every engine of the fleet: bucketed (``rollout.bucket_mb``), one TP
        all-gather per bucket, PP stages broadcast, HF names via the model's adapter; frozen parameters only once.
        Collective."""
        stats = self.fleet.sync(self.actor.modules, self._sync_state)
        if dist.is_initialized():
            dist.barrier()
        return stats

    # ------------------------------------------------------------------ one step
    def _sampling(self) -> dict[str, Any]:
        r = self.cfg.rollout
        return {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "max_new_tokens": r.max_new_tokens}

    def _rollouts_path(self, step: int) -> Path:
        root = Path(self.cfg.rollouts_dir) if self.cfg.rollouts_dir else self.run_dir / "rollouts"
        return root / f"step_{step:06d}.pt"

    def _rollout(self, step: int) -> tuple[list[Group], dict[str, float]]:
        cfg = self.cfg
        if cfg.mode == "train_from_rollouts":
            path = self._rollouts_path(step)
            if not path.is_file():
                raise FileNotFoundError(f"mode=train_from_rollouts: no saved rollouts for step {step} at {path}; "
                                        "record them first with mode=rollout_only (same rollouts_dir)")
            self.loader.next_batch()  # keep the data position in step with the recorded run
            return torch.load(path, weights_only=False), {}
        if self.async_rollout is not None:
            return self._rollout_ahead(step)
        groups, extra = self._generate(step)
        if cfg.mode == "rollout_only" and self.is_rank0:
            path = self._rollouts_path(step)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(groups, path)
        return groups, extra

    def _rollout_ahead(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """Async: this step's groups (generated during the previous step, or now when there are none, as at the
        first step), then the next step's prompts drawn and submitted to the fleet (collected in :meth:`train_step`
        after the update)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.step == step:
            groups, extra = ahead.groups, {"rollout/staleness": 1.0}
        else:
            groups, extra = self._generate(step)
            extra["rollout/staleness"] = 0.0
        if step < self.cfg.total_steps:
            before = self.loader.state_dict()
            self.async_rollout.submit(step + 1, self.loader.next_batch(), n=self.cfg.rollout.n, sampling=self._sampling(),
                                      seed=self.cfg.seed, tokenizer=self.tokenizer, reward_fn=self.reward_fn)
            self._ahead = Ahead(step + 1, [], before)  # its groups arrive in _collect_ahead
        return groups, extra

    def _collect_ahead(self) -> dict[str, float]:
        """Async, at the step boundary: wait for the next step's rollouts and gather them (collective)."""
        if self.async_rollout is None or self.async_rollout.pending is None:
            return {}
        groups, stats = self.async_rollout.collect(data_cfg=self.cfg.data, processor=self.processor, make_aug=self.papo)
        self._ahead.groups = groups
        return stats

    def _generate(self, step: int) -> tuple[list[Group], dict[str, float]]:
        cfg = self.cfg

        def draw() -> list[Group]:  # one batch of prompts over the whole fleet (DAPO refills draw again)
            samples = self.loader.next_batch()
            return self.fleet.generate_groups(samples, n=cfg.rollout.n, sampling=self._sampling(), step=step, seed=cfg.seed,
                                              tokenizer=self.tokenizer, reward_fn=self.reward_fn, data_cfg=cfg.data,
                                              processor=self.processor, make_aug=self.papo)

        if not cfg.algo.dynamic_sampling:
            groups, extra = draw(), {}
        else:
            a = cfg.algo
            res = fill_batch(draw, cfg.optim.rollout_batch_size, a.dynamic_sampling_max_tries,
                             keep_fn=lambda g: keep_group(group_mean(g.rewards, a.dynamic_sampling_key),
                                                          a.dynamic_sampling_low, a.dynamic_sampling_high),
                             on_limit=a.dynamic_sampling_on_limit)
            groups, extra = res.groups, {"dapo/tries": res.tries, "dapo/kept_frac": res.kept / max(1, res.drawn)}
        # colocated on GPUs: the engines give their memory back while the actor trains (on CPU there is nothing
        # to release, and SGLang 0.5.23's release path calls torch.cuda.synchronize and dies there)
        self.fleet.release()
        return groups, extra

    def train_step(self, step: int) -> dict[str, float]:
        """One RL step; returns the metrics logged for it (complete on rank 0)."""
        cfg, g = self.cfg, self.groups
        timing: dict[str, float] = {}
        t = time.perf_counter()
        groups, extra = self._rollout(step)
        timing["rollout"] = time.perf_counter() - t
        metrics = {**rollout_metrics(groups, cfg.rollout.max_new_tokens), **extra}
        if cfg.mode == "rollout_only":
            metrics["timing/rollout"] = timing["rollout"]
            return metrics

        rows_samples = repeat_interleave([gr.sample for gr in groups], cfg.rollout.n)
        responses = [ids for gr in groups for ids in gr.response_ids]
        aug = repeat_interleave([gr.aug_pixel_values for gr in groups], cfg.rollout.n) if self.papo else None
        batch = collate_rollouts(rows_samples, responses, self.pad_id, aug_pixel_values=aug,
                                 pad_to_multiple_of=self.actor.seq_multiple)
        batch.images_per_row = [int(s.image_grid_thw.shape[0]) for s in rows_samples]
        scores = torch.tensor([s for gr in groups for s in gr.scores], dtype=torch.float32)
        scores, metrics["reward/overlong_frac"] = apply_overlong_penalty(  # DAPO soft overlong punishment (0 = off)
            scores, torch.tensor([len(r) for r in responses]), cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer,
            cfg.algo.overlong_penalty)
        adv = compute_advantages(cfg.algo.adv_estimator, scores, batch.group_index)  # not uids: a DAPO refill may repeat a prompt
        B = scores.numel()
        if B % g.dp_size:
            raise RuntimeError(f"{B} rows do not split over data-parallel size {g.dp_size}")
        per_dp = B // g.dp_size
        my_rows = list(range(g.dp_rank * per_dp, (g.dp_rank + 1) * per_dp))
        mbs = cfg.optim.micro_batch_size
        fixed = g.pp_size > 1
        temp = cfg.rollout.temperature

        # ---- log-probs under theta_old (original and masked views) and the reference
        t = time.perf_counter()
        budget = cfg.optim.micro_batch_tokens
        pack = cfg.optim.pack_sequences
        micro = make_micro_batches(batch, my_rows, mbs, with_aug=self.papo, fixed_shape=fixed, token_budget=budget,
                                   pack=pack)
        per_token: dict[str, torch.Tensor] = {}
        per_token["old_logprob"] = self._gather_stats(self.actor, micro, batch, StatsRequest("ori"), temp)
        timing["old_logprob"] = time.perf_counter() - t
        live_or_exact = cfg.algo.aug_mode == "live" or cfg.algo.kl_prcp_estimator == "exact" or cfg.algo.entropy_estimator == "exact"
        if self.papo and not live_or_exact:
            t = time.perf_counter()
            per_token["aug_logprob"] = self._gather_stats(self.actor, micro, batch, StatsRequest("aug"), temp)
            timing["aug_logprob"] = time.perf_counter() - t
        if self.ref is not None:
            t = time.perf_counter()
            if self._offload_ref:
                self.ref.move_to(g.device)
            per_token["ref_logprob"] = self._gather_stats(self.ref, micro, batch, StatsRequest("ori"), temp)
            if self._offload_ref:
                self.ref.move_to(torch.device("cpu"))
            timing["ref_logprob"] = time.perf_counter() - t
        stale = extra.get("rollout/staleness", 0.0) > 0
        metrics.update(self._logprob_checks(step, groups, batch, per_token, my_rows, stale=stale))
        if cfg.algo.rollout_correction != "none":  # the engines' log-probs of the sampled tokens, old_logprob's layout
            per_token["rollout_logprob"] = engine_logprobs_BS(groups, batch.prompt_lens, batch.input_ids.shape)

        # ---- update: mini-batches of whole groups
        t = time.perf_counter()
        n_mini = cfg.optim.rollout_batch_size // cfg.optim.global_batch_size
        rows_per_mini = per_dp // n_mini
        spec = LossSpec.from_config(cfg.algo, step - 1, cfg.total_steps)
        self.lr_scheduler.step(1)  # this step's lr (optim.lr_decay schedule, counted in training steps)
        metrics["optim/lr"] = current_lr(self.actor.optimizer)
        extra_t = {**{k: v for k, v in per_token.items() if v is not None}, "advantages": adv}
        upd: dict[str, float] = {}
        for epoch in range(cfg.optim.ppo_epochs):
            for m in range(n_mini):
                rows = my_rows[m * rows_per_mini:(m + 1) * rows_per_mini]
                all_rows = [d * per_dp + m * rows_per_mini + i for d in range(g.dp_size) for i in range(rows_per_mini)]
                global_tokens = float(batch.label_mask[all_rows].sum())
                mb = make_micro_batches(batch, rows, mbs, extra=extra_t, with_aug=self.papo, fixed_shape=fixed,
                                        token_budget=budget, pack=pack)
                n_micro = len(mb)
                if budget and g.dp_size > 1:  # budgeted counts may differ between DP ranks
                    count = torch.tensor([n_micro], dtype=torch.long, device=g.device)
                    dist.all_reduce(count, group=g.dp_group)
                    n_micro = int(count)
                else:
                    n_micro *= g.dp_size
                out = self.actor.train_mini_batch(mb, spec, temperature=temp, global_tokens=global_tokens,
                                                  global_seqs=float(len(all_rows)), paired=self.papo and live_or_exact,
                                                  want_exact=cfg.algo.entropy_estimator == "exact", global_micro=n_micro)
                if self.is_rank0:
                    self.invariants.ppo_ratio(step, epoch, m, out.get("ppo_kl"))
                self.skipped_updates += int(out.get("update_skipped", 0))
                for k, v in out.items():
                    upd[k] = upd.get(k, 0.0) + v / (n_mini * cfg.optim.ppo_epochs)
        timing["update"] = time.perf_counter() - t
        if self.async_rollout is not None:  # the next step's rollouts: wait (what training did not hide) and gather
            t = time.perf_counter()
            stats = self._collect_ahead()
            stats.pop("timing/rollout_wait", None)
            timing["rollout_wait"] = time.perf_counter() - t
            metrics.update(stats)  # timing/generate, timing/overlap: beside the step, not part of its sum
        metrics.update(upd)
        metrics["loss/kl_prcp"] = metrics.get("loss/kl_prcp", 0.0)
        metrics.setdefault("entropy/aug", 0.0)
        metrics["kl_prcp/gamma"] = spec.kl_prcp_coef
        metrics["update/skipped_total"] = self.skipped_updates

        t = time.perf_counter()
        if cfg.mode == "train":
            self.sync_weights()
        timing["sync"] = time.perf_counter() - t
        n_tokens = int(batch.attention_mask.sum())
        total = sum(timing.values())
        metrics.update({f"timing/{k}": v for k, v in timing.items()})
        metrics["timing/step"] = total
        metrics["throughput/tokens_per_s"] = n_tokens / total if total > 0 else 0.0
        return metrics

    def _gather_stats(self, model: PolicyModel, micro: list[dict[str, Any]], batch: Any, req: StatsRequest,
                      temperature: float) -> Optional[torch.Tensor]:
        """Per-token log-probs ``[B, S]`` on the host for this rank's rows (last stage; None elsewhere)."""
        return gather_token_stats(model.token_stats(micro, req, temperature), micro, batch.input_ids.shape)

    def _logprob_checks(self, step: int, groups: list[Group], batch: Any, per_token: dict[str, Optional[torch.Tensor]],
                        my_rows: list[int], stale: bool = False) -> dict[str, float]:
        """Engine-vs-trainer log-prob gap and the step-1 actor == reference invariant (last stage -> rank 0).

        ``stale`` (async): the engines generated with the weights of one update earlier, so the gap measures that
        staleness, not the engines' exactness: it is logged as ``rollout/logprob_gap_stale`` instead."""
        g = self.groups
        out: dict[str, float] = {}
        old = per_token.get("old_logprob")
        if old is not None:
            eng = engine_logprobs_BS(groups, batch.prompt_lens, old.shape, rows=my_rows)
            mask = batch.label_mask.bool()
            mask[[i for i in range(mask.shape[0]) if i not in set(my_rows)]] = False
            n_eng = max(gr.engine for gr in groups) + 1  # per-engine breakdown: rows of engine k
            row_eng = torch.tensor([gr.engine for gr in groups for _ in gr.response_ids])[:, None]
            diff = (eng - old).abs()
            vals = torch.stack([diff[m].max() if m.any() else torch.tensor(0.0)
                                for m in [mask & (row_eng == k) for k in range(n_eng)]] + [torch.tensor(0.0)])
            ref = per_token.get("ref_logprob")
            if ref is not None and step == 1:
                vals[-1] = (ref - old).abs()[mask].max() if mask.any() else 0.0
            if g.dp_size > 1:  # on the collective's device (NCCL takes no host tensors)
                vals = vals.to(g.device)
                dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=g.dp_group)
                vals = vals.cpu()
            name = "logprob_gap_stale" if stale else "logprob_gap"
            out = {f"rollout/{name}": float(vals[:-1].max())}
            out.update({f"rollout/engine{k}/{name}": float(vals[k]) for k in range(n_eng)})
            if ref is not None and step == 1:
                out["check/actor_ref_gap"] = float(vals[-1])
        if g.pp_size > 1:
            obj = [out]
            dist.broadcast_object_list(obj, src=g.pp_stage_ranks()[-1], group=g.pp_group)
            out = obj[0]
        self.invariants.actor_ref(step, out.get("check/actor_ref_gap"))
        return out

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        """Train to ``total_steps``; returns 0, or 128+signal after a preemption (the last step saved)."""
        cfg = self.cfg
        bar = progress(total=cfg.total_steps, initial=self.step, desc="train", enabled=cfg.logging.progress)
        warn = CollapseDetector()
        while self.step < cfg.total_steps:
            if self._preempted():
                return self.preemption.exit_code
            step = self.step + 1
            skipped_before = self.skipped_updates
            metrics = self.train_step(step)
            self.step = step
            if self.async_saves is not None:
                self.async_saves.poll()  # publishes the previous save once every rank's files are written
            if self.is_rank0:
                for w in warn.update(metrics, step):
                    log.warning("step %d: possible PAPO collapse: %s", step, w)
                self.metrics.write(step, metrics)
                log.info(_summary(step, cfg.total_steps, metrics))
            self.skip_guard.update(step, self.skipped_updates - skipped_before, metrics.get("grad_norm", float("nan")))
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0:
                self.evaluate(step)
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
                self.save()
            if cfg.checkpoint.hf_every and step % cfg.checkpoint.hf_every == 0:
                self.export_hf()
        bar.close()
        if self._preempted():
            return self.preemption.exit_code
        if cfg.eval_at_end:
            self.evaluate(self.step, final=True)
        if cfg.checkpoint.save_every == 0 or self.step % cfg.checkpoint.save_every:
            self.save()
        self.finish_writes()
        self.metrics.close()
        return 0

    def _preempted(self) -> bool:
        """Collective check between steps: on a preemption signal save the last finished step (unless saved)."""
        p = self.preemption
        if p is None or not p.requested(self.groups.device):
            return False
        if self.step > self._saved_step:
            self.save()
        self.finish_writes()
        log.warning("preempted by %s: saved step %d (%s); exiting %d", p.signal_name, self._saved_step,
                    self.ckpt_root / "latest", p.exit_code)
        self.metrics.close()
        p.finish()
        return True

    def evaluate(self, step: int, final: bool = False) -> dict[str, float]:
        """avg@k on every validation benchmark, questions split over the fleet: ``eval/<name>/*``, macro, best so
        far (collective; the metrics are written on rank 0)."""
        res: dict[str, float] = {}
        if self.fleet.started:
            res = self.validator(self.fleet, step, final)
            if self.is_rank0:
                self.metrics.write(step, res)
        return res

    def close(self) -> None:
        """Shut the fleet's engines and the reward workers down (idempotent); an async save still in flight (an
        error path: ``run`` waits for it) is dropped unpublished, an HF export being written is finished."""
        if self.async_saves is not None:
            self.async_saves.abandon()
        if self.hf_exports is not None:
            self.hf_exports.close()
        if self.async_rollout is not None:
            self.async_rollout.close()
        self.fleet.shutdown()
        close = getattr(self.reward_fn, "close", None)
        if close is not None:
            close()


def _summary(step: int, total: int, m: dict[str, float]) -> str:
    keys = [("reward/mean", "reward"), ("reward/accuracy", "acc"), ("loss/pg", "pg"), ("kl/prcp", "kl_prcp"),
            ("kl/ref", "kl_ref"), ("entropy/ori", "H"), ("rollout/logprob_gap", "gap"), ("rollout/logprob_gap_stale", "gap_stale"),
            ("timing/step", "s")]
    parts = [f"{short}={m[k]:.4g}" for k, short in keys if k in m and isinstance(m[k], (int, float)) and math.isfinite(m[k])]
    return f"step {step}/{total} " + " ".join(parts)
