"""Process groups, the one place that talks to ``megatron.core.parallel_state``.

``init_distributed(parallel_cfg)`` starts torch.distributed (NCCL on CUDA, gloo on CPU) unless it
is already running, validates the layout, initialises Megatron-Core's model-parallel state exactly
once, applies the CPU compatibility layer on CPU, seeds every rank deterministically, and returns a
``ParallelGroups`` object. Everything else receives that object (or single groups from it) as an
argument; no other module calls ``parallel_state.get_*``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_papo.config.parallel import ParallelConfig
from megatron_papo.parallel.dims import ParallelDims

__all__ = ["ParallelDims", "ParallelGroups", "init_distributed", "resolve_device", "seed_everything", "shutdown"]

_STATE: Optional[ParallelGroups] = None


@dataclass
class ParallelGroups:
    """Explicit process groups and ranks of this process."""

    dims: ParallelDims
    device: torch.device
    rank: int
    world_size: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    dp_cp_group: Any
    mp_group: Any
    embd_group: Any
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    mcore: Any  # megatron.core.process_groups_config.ProcessGroupCollection
    dp_gloo_group: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def pp_stage_ranks(self) -> list[int]:
        """Global ranks of the pipeline group of this rank, in stage order."""
        return dist.get_process_group_ranks(self.pp_group)


def resolve_device(cfg: ParallelConfig) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is a config error."""
    from megatron_papo.config.base import ConfigError

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device=cuda but no CUDA device is visible; use parallel.device=auto or cpu")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int, groups: Optional[ParallelGroups] = None) -> None:
    """Seed python/numpy/torch; with groups, also mcore's named RNG states (tp rank offsets)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if groups is not None:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(
            seed, tp_rank=groups.tp_rank, ep_rank=0, etp_rank=0, force_reset_rng=True)


def init_distributed(cfg: ParallelConfig, seed: int = 1) -> ParallelGroups:
    """Start (or reuse) torch.distributed, initialise mcore model-parallel state once, return groups."""
    global _STATE
    if _STATE is not None:
        return _STATE
    device = resolve_device(cfg)
    if not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if "RANK" not in os.environ:  # single process without torchrun
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    world = dist.get_world_size()
    dims = ParallelDims(world_size=world, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, ep=cfg.ep).validate()
    if device.type == "cpu":
        from megatron_papo.parallel.cpu import apply_cpu_compat

        apply_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
            context_parallel_size=dims.cp, distributed_timeout_minutes=max(1, cfg.timeout_s // 60),
            create_gloo_process_groups=device.type == "cuda",
        )
    pgc = ProcessGroupCollection.use_mpu_process_groups(
        required_pgs=["tp", "pp", "mp", "embd", "pos_embd", "cp", "tp_cp", "dp", "dp_cp", "tp_dp_cp",
                      "intra_dp_cp", "ep", "expt_tp", "tp_ep", "tp_ep_pp", "expt_dp", "intra_expt_dp",
                      "inter_dist_opt", "intra_dist_opt"])
    groups = ParallelGroups(
        dims=dims, device=device, rank=dist.get_rank(), world_size=world,
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(), dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        mp_group=ps.get_model_parallel_group(), embd_group=ps.get_embedding_group(check_initialized=False),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=dims.tp,
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=dims.pp,
        dp_rank=ps.get_data_parallel_rank(), dp_size=dims.dp, mcore=pgc,
    )
    seed_everything(seed, groups)
    _STATE = groups
    return groups


def shutdown() -> None:
    """Tear down mcore state and the default process group (tests, clean exits)."""
    global _STATE
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
