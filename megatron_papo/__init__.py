"""megatron_papo: PAPO (Perception-Aware Policy Optimization), GRPO and DAPO for Qwen2.5-VL on Megatron-Core."""

__version__ = "0.1.0"
