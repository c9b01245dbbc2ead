"""Config section ``optim``: optimizer and batch geometry."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_papo.config.base import field


@dataclass
class OptimConfig:
    """AdamW via megatron-core's optimizer; batch sizes count prompts unless noted."""

    lr: float = field(1.0e-6, help="learning rate (constant schedule)")
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
