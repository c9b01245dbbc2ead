"""Step-time breakdown (rollout, log-probs, update, sync) of GRPO vs PAPO (faithful, live) on ``tiny_cpu``.

One process, one SGLang engine shared by the variants, the same prompts and seeds for all. The
variants run round robin, one step each in turn (each first pushes its own weights, untimed), so
machine drift and warm-up hit all alike. Prints one JSON object: per variant the median of every
``timing/*`` over the measured steps, and the ratios PAPO/GRPO of the median step time.

    .venv/bin/python tools/bench/train_step.py --steps 10 --warmup 2
    .venv/bin/python tools/bench/train_step.py --variants papo_faithful papo_faithful_budget papo_faithful_packed
    .venv/bin/python tools/bench/train_step.py --variants papo_faithful papo_faithful_async --steps 12 --warmup 2
    .venv/bin/python tools/bench/train_step.py --variants papo_faithful_save_sync papo_faithful_save_async --steps 8 --warmup 2

With an ``*_async`` variant (``rollout.async_steps=1`` + TIS) every variant runs on a separate engine fed through a
gloo weight group (``rollout.placement=separate rollout.transport=distributed``), so the synchronous and the
overlapped step differ in the overlap only; the trainers are told one step more than they run, so every measured
async step also generates the next one. Async phases: ``timing/rollout`` (take the groups made ahead and submit
the next batch), ``timing/rollout_wait`` (wait for the generation training did not hide, and the gather), and,
beside the step's sum, ``timing/generate`` (the background generation) and ``timing/overlap`` (its part that ran
while the actor trained).

The ``*_save_*`` variants save a dist-checkpoint after every step, as ``Trainer.run`` does (the once-per-step poll
of a save in flight, then ``Trainer.save``): ``timing/save`` is the time training stood still for it (sync: the whole
save; async: planning, the host copy and the writer start, plus waiting for the previous save if still in flight),
``timing/step_with_save`` the step plus that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "grpo": ["algo.kl_prcp_coef=0.0"],
    "papo_faithful": ["algo.kl_prcp_coef=0.02", "algo.aug_mode=detached"],
    "papo_live": ["algo.kl_prcp_coef=0.02", "algo.aug_mode=live", "algo.aug_entropy_coef=0.01"],
    "papo_exact_kl": ["algo.kl_prcp_coef=0.02", "algo.kl_prcp_estimator=exact"],
    # micro-batch layouts of the faithful variant at the fixed layout's size (64 rows x ~46 tokens): length-bucketed
    # padded rows vs packed rows (dense [L, L] segment mask on the local layers)
    "papo_faithful_budget": ["algo.kl_prcp_coef=0.02", "optim.micro_batch_tokens=3072"],
    "papo_faithful_packed": ["algo.kl_prcp_coef=0.02", "optim.micro_batch_tokens=3072", "optim.pack_sequences=true"],
    # overlapped rollouts, one step off-policy, with truncated importance sampling (needs a separate engine)
    "papo_faithful_async": ["algo.kl_prcp_coef=0.02", "algo.aug_mode=detached", "rollout.async_steps=1",
                            "algo.rollout_correction=tis"],
    # a dist-checkpoint (model + optimizer) after every step: synchronous vs megatron-core async save
    "papo_faithful_save_sync": ["algo.kl_prcp_coef=0.02", "algo.aug_mode=detached"],
    "papo_faithful_save_async": ["algo.kl_prcp_coef=0.02", "algo.aug_mode=detached", "checkpoint.async_save=true"],
}
SEPARATE = ["rollout.placement=separate", "rollout.transport=distributed"]
DEFAULT_VARIANTS = ["grpo", "papo_faithful", "papo_live", "papo_exact_kl"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="steps per variant (including warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps excluded from the means")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from megatron_papo.config import load_config
    from megatron_papo.parallel import init_distributed
    from megatron_papo.rollout_phase import make_engine
    from megatron_papo.train import prepare_model_dir
    from megatron_papo.trainer import Trainer

    root = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    overlapped = any(name.endswith("_async") for name in args.variants)
    load_before = os.getloadavg()
    base = ["checkpoint.save_every=0", "eval_at_end=false", "logging.progress=false", "logging.backends=jsonl",
            "checkpoint.resume=never", *(SEPARATE if overlapped else []), *args.overrides]
    engine = None
    groups = None
    trainers = {}
    for name in args.variants:
        # one step more than run: an async trainer generates ahead at every measured step (none past total_steps)
        cfg = load_config("tiny_cpu", base + VARIANTS[name] + [f"run_dir={root / name}", f"total_steps={args.steps + 1}"])
        groups = groups or init_distributed(cfg.parallel, seed=cfg.seed)
        hf_dir = prepare_model_dir(cfg, groups.rank) if engine is None else str(root / args.variants[0] / "tiny_model")
        if engine is None:
            engine = make_engine(cfg.rollout, hf_dir).start()
        trainers[name] = Trainer(cfg, groups, hf_dir, engine_factory=lambda c, d, slot, e=engine: e)
    # round robin over the variants, step by step, so machine drift and warm-up hit every variant alike; the engine
    # is shared, so each variant first pushes its own weights (untimed) and then runs a full, timed step
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
    for step in range(1, args.steps + 1):
        for name, trainer in trainers.items():
            trainer.sync_weights()
            metrics = trainer.train_step(step)
            trainer.step = step
            if "_save_" in name:  # what Trainer.run does after a step with save_every=1
                t0 = time.perf_counter()
                if trainer.async_saves is not None:
                    trainer.async_saves.poll()
                trainer.save()
                metrics["timing/save"] = time.perf_counter() - t0
                metrics["timing/step_with_save"] = metrics["timing/step"] + metrics["timing/save"]
            rows[name].append(metrics)
    out: dict[str, dict[str, float]] = {}
    for name, trainer in trainers.items():
        measured = rows[name][args.warmup:]
        keys = sorted(k for k in measured[0] if k.startswith("timing/"))
        out[name] = {k: statistics.median(r[k] for r in measured) for k in keys}
        trainer.finish_writes()
        trainer.fleet.engines = {}  # shared: shut down once at the end
    if engine is not None:
        engine.shutdown()
    base_t = out.get("grpo", {}).get("timing/step")
    ratios = {f"{k}/grpo": v["timing/step"] / base_t for k, v in out.items() if base_t and k != "grpo"}
    faithful = out.get("papo_faithful", {})
    if "papo_faithful_async" in out and faithful:  # overlapped vs synchronous rollouts, same separate engine
        for phase in ("timing/step", "timing/update"):
            ratios[f"papo_faithful_async/papo_faithful:{phase}"] = out["papo_faithful_async"][phase] / faithful[phase]
    for k in ("papo_faithful_budget", "papo_faithful_packed"):  # micro-batch layouts vs fixed micro_batch_size
        if k in out and faithful:
            for phase in ("timing/step", "timing/update", "timing/old_logprob"):
                ratios[f"{k}/papo_faithful:{phase}"] = out[k][phase] / faithful[phase]
    if "papo_faithful_save_sync" in out and "papo_faithful_save_async" in out:
        for phase in ("timing/step_with_save", "timing/save"):
            ratios[f"save_async/save_sync:{phase}"] = (out["papo_faithful_save_async"][phase]
                                                       / out["papo_faithful_save_sync"][phase])
    load = os.getloadavg()
    print(json.dumps({"steps": args.steps, "warmup": args.warmup, "placement": "separate" if overlapped else "colocated",
                      "load_avg_before": [round(x, 1) for x in load_before],
                      "load_avg_after": [round(x, 1) for x in load], "timing": out, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
