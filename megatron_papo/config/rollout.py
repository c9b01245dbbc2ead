"""Config section ``rollout``: the generation engine and how it is fed weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_papo.config.base import field


@dataclass
class RolloutConfig:
    """Sampling and engine settings (PAPO defaults: n=5, temperature 1.0, top_p 0.99)."""

    engine: Literal["sglang", "vllm"] = field("sglang", help="rollout engine")
    mode: Literal["colocated", "server"] = field(
        "colocated", help="colocated: the engine runs in processes owned by global rank 0 (SGLang: a host process "
        "holding sglang.Engine); server: an sglang.launch_server process driven over HTTP (SGLang only)")
    placement: Literal["colocated", "separate"] = field(
        "colocated", help="colocated: the engine shares the trainer's devices (on GPUs it releases its memory while "
        "the actor trains); separate: the engine has devices of its own (rollout.engine_base_gpu) and receives "
        "weights through transport=distributed or disk, never through shared memory")
    engine_base_gpu: int = field(-1, help="placement=separate on GPUs: the first GPU id of the engine's TP group "
                                 "(SGLang base_gpu_id); -1 = SGLang's default (colocated)")
    n: int = field(5, help="responses sampled per prompt (group size)")
    temperature: float = field(1.0, help="sampling temperature; logits are divided by it in the trainer too")
    top_p: float = field(0.99, help="nucleus sampling")
    top_k: int = field(-1, help="top-k sampling; -1 = off")
    max_new_tokens: int = field(2048, help="maximum response length in tokens")
    transport: Literal["tensor", "distributed", "disk"] = field(
        "tensor", help="weight transport: in-process tensors/IPC, broadcast group, or safetensors on disk")
    bucket_mb: int = field(512, help="weight-sync bucket size in MiB")
    timeout_s: float = field(600.0, help="timeout of any single engine call (generate, weight update, ...)")
    start_timeout_s: float = field(900.0, help="timeout of the engine start (model load)")
    seed: int = field(1, help="engine sampling seed")
    engine_tp: int = field(1, help="tensor-parallel size of each rollout engine (its own GPUs/processes); colocated: "
                           "one engine per engine_tp consecutive trainer ranks of a node (world_size/engine_tp engines)")
    num_engines: int = field(0, help="placement=separate: engines started by rank 0 (engine k on GPUs engine_base_gpu + "
                             "k*engine_tp ...); 0 = one (none if server_urls are given); colocated: must be 0 (derived)")
    server_urls: list[str] = field(default_factory=list, help="placement=separate, mode=server: SGLang servers started "
                                   "elsewhere (e.g. other nodes) that join the fleet; needs transport=distributed or disk")
    router: bool = field(True, help="placement=separate, mode=server: put sglang-router in front of the servers "
                         "(rollout requests go through it, addressed to their engine)")
    skip_frozen: bool = field(True, help="weight sync: push frozen (requires_grad=False) parameters only once")
