"""Workers for the optimizer CPU-offload test: which optimizer holds the fp32 master weights."""

from __future__ import annotations

from typing import Any


def hybrid_optimizer_structure(hf_dir: str, cpu_offload_fraction: float) -> dict[str, Any]:
    """Build the tiny Qwen2.5-VL in bf16 under the distributed optimizer with CPU offload; report who owns what.

    mcore's ``HybridDeviceOptimizer`` cannot be built on a machine without CUDA: its constructor asks for
    ``torch.cuda.current_stream()``, and ``OptimizerConfig`` with the precision-aware flag asks Transformer Engine
    for its version. This worker (its own process) answers both as the GPU container would (a stream placeholder;
    TE >= 2.1), only to build the optimizer objects: no step runs. The CPU compatibility layer makes the distributed
    optimizer accept the CPU bf16 parameters as it accepts CUDA ones.
    """
    import torch
    from megatron.core.optimizer import optimizer_config

    from megatron_papo.config.model import ModelConfig
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings, build_optimizer, wrap_ddp

    optimizer_config.is_te_min_version = lambda *a, **k: True
    torch.cuda.current_stream = lambda *a, **k: None
    pg = init_distributed(ParallelConfig(device="cpu"))
    model = build_model(ModelConfig(dtype="bfloat16"), pg, hf_dir=hf_dir)
    # Without Transformer Engine (and apex) mcore builds the final norm as a torch norm with fp32 weights; on GPU it
    # is TE's norm in params_dtype. Match the GPU: every parameter bf16 (an fp32 parameter reaches the hybrid
    # optimizer as a non-leaf view of itself, which torch's optimizer refuses).
    model.language_model.decoder.final_layernorm.to(torch.bfloat16)
    chunks = wrap_ddp([model], pg, use_distributed_optimizer=True)
    settings = OptimSettings(lr=1e-3, use_distributed_optimizer=True, bf16=True, cpu_offload_fraction=cpu_offload_fraction)
    chained = build_optimizer(chunks, settings, pg)
    (opt,) = getattr(chained, "chained_optimizers", [chained])  # one dense param-group optimizer here
    inner = opt.optimizer
    shards = [p for g in opt.shard_float16_groups for p in g if p is not None]
    masters = [p for g in opt.shard_fp32_from_float16_groups for p in g if p is not None]
    hdo_params = [p for g in inner.param_groups for p in g["params"]]
    fp32_copies = list(getattr(inner, "param_to_fp32_param", {}).values())
    return {
        "outer": type(opt).__name__, "inner": type(inner).__name__,
        "precision_aware": bool(opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8),
        "bf16_shards": len(shards), "shard_numel": sum(p.numel() for p in shards),
        "distopt_fp32_masters": len(masters),
        "hdo_param_dtypes": sorted({str(p.dtype) for p in hdo_params}),
        "hdo_params_are_shards": len(hdo_params) == len(shards) and all(
            any(p is s for s in shards) for p in hdo_params),
        "hdo_fp32_masters": len(fp32_copies), "hdo_fp32_numel": sum(p.numel() for p in fp32_copies),
        "hdo_fp32_dtypes": sorted({str(p.dtype) for p in fp32_copies}),
    }


def hybrid_optimizer_on_gpu(hf_dir: str, cpu_offload_fraction: float) -> dict[str, Any]:
    """GPU only (tests/gpu): the same build on CUDA, with nothing patched; where the hybrid optimizer put the fp32
    masters (host or device) and how much device memory the optimizer build took, with and without offload."""
    import torch

    from megatron_papo.config.model import ModelConfig
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings, build_optimizer, wrap_ddp

    pg = init_distributed(ParallelConfig(device="cuda"))
    out: dict[str, Any] = {}
    for fraction in (0.0, cpu_offload_fraction):
        model = build_model(ModelConfig(dtype="bfloat16"), pg, hf_dir=hf_dir)
        load_hf_into_mcore([model], hf_dir, pg)
        chunks = wrap_ddp([model], pg, use_distributed_optimizer=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        settings = OptimSettings(lr=1e-3, use_distributed_optimizer=True, bf16=True, cpu_offload_fraction=fraction)
        chained = build_optimizer(chunks, settings, pg)
        torch.cuda.synchronize()
        (opt,) = getattr(chained, "chained_optimizers", [chained])
        res = {"optimizer_bytes_on_gpu": torch.cuda.memory_allocated() - before, "inner": type(opt.optimizer).__name__}
        if fraction > 0:
            inner = opt.optimizer
            masters = list(inner.param_to_fp32_param.values())
            res["fp32_on_cpu"] = sum(m.numel() for m in masters if not m.is_cuda)
            res["fp32_on_gpu"] = sum(m.numel() for m in masters if m.is_cuda)
            res["largest_shard"] = max(p.numel() for p in inner.param_to_fp32_param)
        out[str(fraction)] = res
        del chained, opt, chunks, model
        torch.cuda.empty_cache()
    return out
