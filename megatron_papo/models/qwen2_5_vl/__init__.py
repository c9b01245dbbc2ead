"""Qwen2.5-VL on Megatron-Core: vision tower + M-RoPE language model, layer specs, the one HF adapter.

Public interface (what the trainer, converter and weight sync use)::

    build_model(model_cfg, pg, hf_dir=..., sequence_parallel=...) -> Qwen25VLModel   (one PP stage)
    load_hf_into_mcore(model_chunks, hf_dir)                                         (streams safetensors)
    export_to_hf(model_chunks) -> iterator of (checkpoint_name, full tensor)         (collective)
    forward_logits(model, batch) -> vocab-parallel logits [B, S, V/tp]
    make_forward_step(loss_fn) -> forward_step_func for mcore schedules
"""

from megatron_papo.models.qwen2_5_vl.build import build_model, forward_logits, make_forward_step, resolve_dtype
from megatron_papo.models.qwen2_5_vl.config import (
    PUBLISHED_CONFIGS,
    ModelConfigError,
    QwenVLArch,
    arch_from_hf_config,
    load_arch,
)
from megatron_papo.models.qwen2_5_vl.hf_adapter import (
    build_plan,
    export_plan,
    export_to_hf,
    load_hf_into_mcore,
    load_state_dict_into_mcore,
    shards_to_hf,
    to_checkpoint_name,
    to_transformers_name,
)
from megatron_papo.models.qwen2_5_vl.model import Qwen25VLModel
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index

__all__ = [
    "PUBLISHED_CONFIGS", "ModelConfigError", "Qwen25VLModel", "QwenVLArch", "arch_from_hf_config", "build_model",
    "build_plan", "export_plan", "export_to_hf", "forward_logits", "get_rope_index", "load_arch",
    "load_hf_into_mcore", "load_state_dict_into_mcore", "make_forward_step", "resolve_dtype", "shards_to_hf",
    "to_checkpoint_name", "to_transformers_name",
]
