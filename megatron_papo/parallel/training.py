"""Megatron-Core training plumbing: DDP wrapping, the optimizer, and one forward-backward-step call.

These helpers are model-agnostic (the tiny GPT of the foundation tests and Qwen2.5-VL use the same
code). Groups come from ``ParallelGroups``; the harness rules from env_notes.md are applied here:
``finalize_model_grads_func`` and ``no_sync_func`` are set on the model config, the optimizer's
gradients are zeroed every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch

from megatron_papo.parallel import ParallelGroups


@dataclass
class OptimSettings:
    """The subset of optimizer settings the mcore optimizer needs."""

    lr: float
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    bf16: bool = False
    fp16: bool = False
    cpu_offload_fraction: float = 0.0


def tag_tensor_parallel_params(module: torch.nn.Module) -> int:
    """Mark TP-sharded weights of mcore's parallel layers with ``tensor_model_parallel``/``partition_dim``.

    mcore sets these attributes only inside its weight initialisers, so a model built with
    ``perform_initialization=False`` (weights loaded afterwards) has none; then the global grad norm
    counts sharded weights on TP rank 0 only and clipping differs from TP=1. Returns how many were tagged.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    n = 0
    for mod in module.modules():
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            params = [(getattr(mod, "weight", None), 0), (getattr(mod, "bias", None), 0)]
        elif isinstance(mod, RowParallelLinear):
            params = [(getattr(mod, "weight", None), 1)]
        else:
            continue
        for p, dim in params:
            if isinstance(p, torch.nn.Parameter) and not getattr(p, "tensor_model_parallel", False):
                for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                    if hasattr(p, attr):
                        delattr(p, attr)
                set_tensor_model_parallel_attributes(p, True, dim, 1)
                n += 1
    return n


def wrap_ddp(model_chunks: list[torch.nn.Module], groups: ParallelGroups, *, use_distributed_optimizer: bool = False,
             grad_reduce_in_fp32: bool = True, bucket_size: Optional[int] = None) -> list[torch.nn.Module]:
    """Wrap each model chunk in mcore's DistributedDataParallel (gradient buffers + DP reduction)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=bucket_size,
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_cfg, module=chunk, disable_bucketing=i > 0,
            pg_collection=groups.mcore,
        ))
    cfg = wrapped[0].config
    from megatron.core.distributed import finalize_model_grads

    cfg.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=groups.mcore)
    cfg.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def optimizer_config_kwargs(settings: OptimSettings, device_type: str) -> dict[str, Any]:
    """Keyword arguments of mcore's ``OptimizerConfig`` for ``settings`` on a ``cuda`` or ``cpu`` device.

    CPU offload (``cpu_offload_fraction > 0``) builds mcore's ``HybridDeviceOptimizer``, which works through the
    precision-aware optimizer path: ``use_precision_aware_optimizer=True`` makes the distributed optimizer hand it
    the bf16 parameter shards and gradients (``decoupled_grad``) instead of keeping fp32 master shards of its own on
    the GPU, and the hybrid optimizer keeps the fp32 masters and Adam state of the offloaded share on the CPU
    (Megatron-LM's argument check requires the flag with ``--optimizer-cpu-offload`` for this reason). The flag
    also needs the distributed optimizer and Adam with decoupled weight decay (mcore's defaults here). Host
    buffers are pinned only on CUDA, where there is something to pin for.
    """
    offload = settings.cpu_offload_fraction > 0
    kw: dict[str, Any] = dict(
        optimizer="adam", lr=settings.lr, weight_decay=settings.weight_decay, adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps, clip_grad=settings.clip_grad,
        bf16=settings.bf16, fp16=settings.fp16, use_distributed_optimizer=settings.use_distributed_optimizer,
        params_dtype=torch.bfloat16 if settings.bf16 else torch.float32,
        optimizer_cpu_offload=offload, optimizer_offload_fraction=settings.cpu_offload_fraction,
    )
    if offload:
        kw.update(use_precision_aware_optimizer=True, decoupled_weight_decay=True,
                  pin_cpu_grads=device_type == "cuda", pin_cpu_params=device_type == "cuda")
    return kw


def build_optimizer(model_chunks: list[torch.nn.Module], settings: OptimSettings, groups: ParallelGroups) -> Any:
    """mcore's Megatron optimizer (Adam; optionally the distributed optimizer, optionally part on the CPU) over the
    DDP chunks (see :func:`optimizer_config_kwargs`)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ocfg = OptimizerConfig(**optimizer_config_kwargs(settings, groups.device.type))
    return get_megatron_optimizer(ocfg, model_chunks, use_gloo_process_groups=False, pg_collection=groups.mcore)


def forward_backward(model_chunks: list[torch.nn.Module], forward_step: Callable, data_iterator: Iterator | list[Iterator],
                     num_microbatches: int, groups: ParallelGroups, *, seq_length: int, micro_batch_size: int,
                     forward_only: bool = False) -> list[dict]:
    """Run mcore's forward-backward schedule (no pipelining, or 1F1B across ``groups.pp_group``).

    ``forward_step(data_iterator, model) -> (output_tensor, loss_func)`` as mcore expects. Returns the
    list of per-micro-batch loss dicts (non-empty on the last pipeline stage only).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = model_chunks[0].config
    fb = get_forward_backward_func(pp_size=groups.pp_size, vp_size=None)
    kwargs: dict[str, Any] = dict(
        forward_step_func=forward_step, data_iterator=data_iterator, model=model_chunks,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if groups.pp_size > 1:
        kwargs["p2p_communicator"] = _p2p(groups, cfg)
    kwargs["pg_collection"] = groups.mcore
    return fb(**kwargs)


def _p2p(groups: ParallelGroups, cfg: Any) -> Any:
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    return P2PCommunicator(pp_group=groups.pp_group, config=cfg)


def optimizer_step(optimizer: Any) -> tuple[bool, float, int]:
    """One optimizer step; returns (updated, grad_norm, zeros). A non-finite grad norm skips the update
    (:func:`guarded_step`, in fp32 as in bf16/fp16)."""
    updated, grad_norm = guarded_step(optimizer)
    optimizer.zero_grad()
    return updated, grad_norm, 0


def guarded_step(optimizer: Any, loss: Optional[torch.Tensor] = None, device: Any = None) -> tuple[bool, float]:
    """mcore's optimizer step, skipped when the loss or the global grad norm is not finite; returns
    ``(updated, grad_norm)``. Collective: every rank of the job must call it.

    mcore's own ``step()`` skips only on the grad scaler's inf/nan flag (fp16); in fp32 and bf16 it clips a NaN
    norm and writes NaN weights. This runs the same stages (``prepare_grads`` -> ``get_grad_norm`` -> clip ->
    ``step_with_ready_grads``) and decides in between. The decision is all-reduced (MAX) over the world, so
    every rank skips or steps together even when only one pipeline stage sees the loss. Works for the plain,
    distributed and chained optimizers (the grad norm is already reduced over each one's stats group).
    """
    import torch.distributed as dist
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = bool(optimizer.prepare_grads())
    norm = optimizer.get_grad_norm() if not found_inf else float("nan")
    grad_norm = float(norm) if norm is not None else 0.0
    bad = found_inf or not math.isfinite(grad_norm) or (loss is not None and not bool(torch.isfinite(loss).all()))
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=device if device is not None else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item() > 0)
    if bad:
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def zero_grads(model_chunks: list[torch.nn.Module], optimizer: Any) -> None:
    """Zero the DDP gradient buffers and the optimizer's grads (call at the start of every step)."""
    for m in model_chunks:
        m.zero_grad_buffer()
    optimizer.zero_grad()


def build_lr_scheduler(optimizer: Any, *, lr: float, min_lr: float = 0.0, warmup_steps: int = 0, decay_steps: int = 1,
                       decay_style: str = "constant", weight_decay: float = 0.0) -> Any:
    """megatron-core's ``OptimizerParamScheduler`` over ``optimizer``'s param groups, counted in training steps.

    Call ``step(1)`` before the update of each training step: step s (1-based) then trains at lr*s/warmup during
    warmup, and afterwards at ``decay_style`` (constant | linear | cosine) from lr down to ``min_lr`` at
    ``decay_steps``. The schedule owns max/min lr: they are written into the param groups on every step (mcore's
    optimizer leaves ``min_lr`` unset, and a checkpoint's groups carry the old values), so the config wins on resume
    while ``num_steps`` comes from :meth:`state_dict` (saved with the checkpoint). Weight decay stays constant.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _Scheduler(OptimizerParamScheduler):
        def step(self, increment: int) -> None:
            for group in self.optimizer.param_groups:
                if group.get("default_config", True):
                    group["max_lr"], group["min_lr"] = self.max_lr, self.min_lr
            super().step(increment)

    return _Scheduler(optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=warmup_steps,
                      lr_decay_steps=max(decay_steps, warmup_steps + 1), lr_decay_style=decay_style,
                      start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=1, wd_incr_style="constant",
                      use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def current_lr(optimizer: Any) -> float:
    """The learning rate of the optimizer's default param groups (what ``optim/lr`` logs)."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])
