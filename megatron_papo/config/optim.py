"""Config section ``optim``: optimizer and batch geometry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_papo.config.base import field


@dataclass
class OptimConfig:
    """AdamW via megatron-core's optimizer; batch sizes count prompts unless noted."""

    lr: float = field(1.0e-6, help="peak learning rate (after warmup; the constant value without a schedule)")
    lr_warmup_steps: int = field(0, help="training steps of linear warmup from 0 to lr (step s trains at lr*s/N); "
                                 "0 = lr_warmup_ratio decides")
    lr_warmup_ratio: float = field(0.0, help="warmup as a share of total_steps (rounded down); used when "
                                   "lr_warmup_steps=0")
    lr_decay: Literal["constant", "linear", "cosine"] = field(
        "constant", help="after warmup: constant lr, or linear / cosine decay to min_lr at lr_decay_steps "
        "(megatron-core OptimizerParamScheduler, one step per training step)")
    lr_decay_steps: Optional[int] = field(None, help="step at which the decay reaches min_lr; null = total_steps")
    min_lr: float = field(0.0, help="floor of linear / cosine decay")
    weight_decay: float = field(1.0e-2, help="AdamW weight decay")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.999, help="AdamW beta2")
    adam_eps: float = field(1.0e-8, help="AdamW epsilon")
    clip_grad: float = field(1.0, help="global grad-norm clip (0 = off); a non-finite loss or grad norm skips the "
                             "update (fp32, bf16, fp16), counted in update/skipped_total")
    max_skipped_steps: int = field(3, help="stop the run (exit 3, one line) after this many consecutive steps with a "
                                   "skipped update; 0 = never stop")
    use_distributed_optimizer: bool = field(False, help="shard optimizer state over data-parallel ranks")
    cpu_offload_fraction: float = field(0.0, help="share of the optimizer state and step kept on the CPU (mcore "
                                        "HybridDeviceOptimizer; needs use_distributed_optimizer); 0 = off")
    rollout_batch_size: int = field(384, help="prompts sampled per training step")
    global_batch_size: int = field(128, help="prompts per optimizer step (mini-batch)")
    micro_batch_size: int = field(4, help="responses per micro-batch per data-parallel rank")
    micro_batch_tokens: int = field(0, help="token-budget micro-batching: rows of similar length together, at most "
                                    "this many padded tokens (rows x longest row) per micro-batch; 0 = fixed "
                                    "micro_batch_size rows. Not with pipeline parallelism (fixed shapes)")
    pack_sequences: bool = field(False, help="pack responses side by side into rows as wide as the longest row, "
                                 "micro_batch_tokens per micro-batch (segment-causal attention, per-sample M-RoPE); "
                                 "needs micro_batch_tokens > 0 and model.transformer_impl=local")
    ppo_epochs: int = field(1, help="passes over each rollout batch")


def lr_schedule_steps(optim: OptimConfig, total_steps: int) -> tuple[int, int]:
    """Resolved ``(warmup_steps, decay_steps)`` of the learning-rate schedule (counted in training steps)."""
    warmup = optim.lr_warmup_steps or int(optim.lr_warmup_ratio * total_steps)
    decay = optim.lr_decay_steps if optim.lr_decay_steps is not None else total_steps
    if optim.lr_decay == "constant":
        decay = max(decay, warmup + 1)  # unused by a constant schedule; megatron-core wants warmup < decay
    return warmup, decay
