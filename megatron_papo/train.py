"""``megatron-papo train``: load config -> init distributed -> build Trainer -> run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_papo.config import Config, dump, load_config
from megatron_papo.utils.logging import get_logger, setup_logging


def prepare_model_dir(cfg: Config, rank: int) -> str:
    """``model.path`` or, for ``tiny``, the embedded tiny checkpoint built once in the run dir (rank 0)."""
    if cfg.model.path != "tiny":
        from megatron_papo.config import ConfigError

        conf = Path(cfg.model.path) / "config.json"
        if not conf.is_file():
            raise ConfigError(f"model.path={cfg.model.path} is not an HF checkpoint directory (no config.json)")
        try:
            json.loads(conf.read_text())
        except (ValueError, OSError) as e:
            raise ConfigError(f"model.path: {conf} is not readable JSON ({type(e).__name__}: {e}); restore the "
                              "checkpoint's config.json") from None
        return cfg.model.path
    out = Path(cfg.run_dir) / "tiny_model"
    if rank == 0 and not (out / "model.safetensors").is_file():
        from dataclasses import asdict

        from megatron_papo.fixtures.tiny import make_tiny

        make_tiny(out, **asdict(cfg.model.tiny))
    if dist.is_initialized():
        dist.barrier()
    return str(out)


def check_placement(cfg: Config, device_type: str, local_world_size: int) -> None:
    """Device checks of the placement options: optimizer CPU offload is a GPU feature; a colocated engine cannot join
    an NCCL weight group with the trainer (same GPU); placement=separate on GPUs needs engine GPUs that exist and are
    not the trainer's (one per local rank)."""
    from megatron_papo.config import ConfigError

    r = cfg.rollout
    if cfg.optim.cpu_offload_fraction > 0 and device_type != "cuda":
        raise ConfigError(f"optim.cpu_offload_fraction={cfg.optim.cpu_offload_fraction} offloads GPU optimizer state; "
                          "on CPU everything is already in host memory: set it to 0")
    if r.placement == "colocated" and r.transport == "distributed" and device_type == "cuda":
        raise ConfigError("rollout.transport=distributed with placement=colocated on GPUs puts trainer rank 0 and the "
                          "engine's TP rank 0 on one GPU in one NCCL group, which NCCL refuses: use rollout.transport="
                          "tensor (CUDA IPC) or disk")
    if r.placement != "separate" or device_type != "cuda":
        return

    if r.engine_base_gpu < 0:
        raise ConfigError("rollout.placement=separate on GPUs needs rollout.engine_base_gpu (the engine's first GPU, "
                          f">= {local_world_size} here: this node's trainer ranks use GPUs 0..{local_world_size - 1})")
    if r.engine_base_gpu < local_world_size:
        raise ConfigError(f"rollout.engine_base_gpu={r.engine_base_gpu} overlaps the trainer's GPUs "
                          f"0..{local_world_size - 1}; start it at {local_world_size} or launch fewer trainer ranks")
    import torch

    local = r.num_engines or (0 if r.server_urls else 1)
    if r.engine_base_gpu + local * r.engine_tp > torch.cuda.device_count():
        raise ConfigError(f"rollout.engine_base_gpu={r.engine_base_gpu} + num_engines={local} x engine_tp={r.engine_tp} "
                          f"exceeds the {torch.cuda.device_count()} visible GPUs")


def main(recipe: Optional[str], overrides: Sequence[str]) -> int:
    """Run training; returns the process exit code."""
    cfg = load_config(recipe, overrides)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron_papo.preemption import Preemption

    # installed first: a signal during the (long) model/engine start is acted on at the first safe point
    ck = cfg.checkpoint
    preemption = Preemption(ck.preempt_signals, ck.preempt_timeout_s) if ck.preempt_signals else None
    from megatron_papo.parallel import init_distributed, shutdown

    groups = init_distributed(cfg.parallel, seed=cfg.seed)
    run_dir = Path(cfg.run_dir)
    setup_logging(cfg.logging.level, run_dir / "logs", rank=groups.rank)
    log = get_logger("train")
    if groups.rank == 0:
        dump(cfg, run_dir / "config.yaml")
        dump(cfg, run_dir / "config.json")
        log.info("run dir %s; world %d = tp %d x pp %d x dp %d on %s", run_dir, groups.world_size, groups.tp_size,
                 groups.pp_size, groups.dp_size, groups.device)
    hf_dir = prepare_model_dir(cfg, groups.rank)
    from megatron_papo.models.qwen2_5_vl import load_arch

    arch = load_arch(hf_dir)
    groups.dims.check_model(num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, num_layers=arch.num_layers,
                            vision_heads=arch.vision.num_heads)
    check_placement(cfg, groups.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    from megatron_papo.rollout.fleet import default_engine_factory
    from megatron_papo.trainer import Trainer

    factory = None if cfg.mode == "train_from_rollouts" else default_engine_factory  # one engine per fleet slot
    try:
        trainer = Trainer(cfg, groups, hf_dir, engine_factory=factory)
    except BaseException:
        shutdown()
        raise
    trainer.preemption = preemption
    try:
        code = trainer.run()  # 0, or 128+signal after a preemption save (143 for SIGTERM)
    finally:
        trainer.close()
        shutdown()
    return code
