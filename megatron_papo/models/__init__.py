"""Model implementations on Megatron-Core (Qwen2.5-VL)."""
