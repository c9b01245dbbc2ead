"""Config section ``parallel``: how the job is split over processes and which device it uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_papo.config.base import field


@dataclass
class ParallelConfig:
    """Parallel layout; dp is derived: world_size / (tp * pp * cp)."""

    tp: int = field(1, help="tensor-parallel size (splits heads, MLP and vocabulary)")
    pp: int = field(1, help="pipeline-parallel size (splits transformer layers; vision tower on stage 0)")
    cp: int = field(1, help="context-parallel size (only 1 is supported for now)")
    ep: int = field(1, help="expert-parallel size (dense models only: must be 1)")
    sequence_parallel: bool = field(False, help="shard activations along the sequence inside TP regions (tp>1)")
    device: Literal["auto", "cpu", "cuda"] = field("auto", help="auto: cuda when available, else cpu (gloo)")
    backend: Literal["auto", "gloo", "nccl"] = field("auto", help="auto: nccl on cuda, gloo on cpu")
    timeout_s: int = field(1800, help="process-group collective timeout in seconds")
