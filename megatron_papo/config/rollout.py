"""Config section ``rollout``: the generation engine and how it is fed weights."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from megatron_papo.config.base import ConfigError, field

#: engine keyword arguments that other ``rollout`` fields own (one owner per knob)
OWNED_ENGINE_KWARGS: dict[str, dict[str, str]] = {
    "sglang": {"model_path": "model.path", "tp_size": "rollout.engine_tp", "random_seed": "rollout.seed",
               "base_gpu_id": "rollout.engine_base_gpu"},
    "vllm": {"model": "model.path", "tensor_parallel_size": "rollout.engine_tp", "seed": "rollout.seed"},
}


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
    async_steps: int = field(
        0, help="0: generate, then train (on-policy); 1: the engines generate step k+1's rollouts (with the weights "
        "step k's update starts from) while the actor trains on step k's, weights sync at the step boundary -- one "
        "step off-policy (pair with algo.rollout_correction). Needs placement=separate, mode=train, no DAPO dynamic "
        "sampling")
    skip_frozen: bool = field(True, help="weight sync: push frozen (requires_grad=False) parameters only once")
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict, help="extra keyword arguments of the engine (SGLang: ServerArgs fields such as "
        "mem_fraction_static, enable_memory_saver, enable_weights_cpu_backup, cuda_graph_max_bs; vLLM: LLM/EngineArgs "
        "fields); they override the adapter's defaults. Set one with rollout.engine_kwargs.<name>=<value>")


@cache
def engine_arg_names(engine: str) -> frozenset[str] | None:
    """Keyword arguments the installed engine accepts (SGLang: ``ServerArgs`` fields; vLLM: ``EngineArgs``
    fields), or None when that engine is not installed here (then nothing is checked)."""
    import dataclasses

    try:
        if engine == "sglang":
            from sglang.srt.arg_groups.arg_utils import field_names
            from sglang.srt.server_args import ServerArgs

            return frozenset(field_names(ServerArgs))
        from vllm.engine.arg_utils import EngineArgs

        return frozenset(f.name for f in dataclasses.fields(EngineArgs))
    except ImportError:
        return None


def check_engine_kwargs(engine: str, kwargs: dict[str, Any]) -> None:
    """Reject ``rollout.engine_kwargs`` keys that another field owns or that the engine does not know (one line)."""
    for key in kwargs:
        if not isinstance(key, str):
            raise ConfigError(f"rollout.engine_kwargs: key {key!r} must be a string (an engine argument name)")
        owner = OWNED_ENGINE_KWARGS.get(engine, {}).get(key)
        if owner is not None:
            raise ConfigError(f"rollout.engine_kwargs.{key} is set by {owner}: set {owner} instead")
        if engine == "vllm" and key == "logprobs_mode" and kwargs[key] != "processed_logprobs":
            raise ConfigError(f"rollout.engine_kwargs.logprobs_mode={kwargs[key]!r}: the trainer compares against "
                              "processed_logprobs (temperature and banned ids applied); remove it")
    known = engine_arg_names(engine) if kwargs else None
    if known is None:
        return
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        import difflib

        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        what = "ServerArgs" if engine == "sglang" else "EngineArgs"
        raise ConfigError(f"rollout.engine_kwargs: {', '.join(unknown)} not a field of {engine}'s {what}"
                          + "".join(f" (did you mean {h[0]}?)" for h in hints.values() if h)
                          + "; see its server arguments for the names")
