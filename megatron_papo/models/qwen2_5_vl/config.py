"""Qwen2.5-VL architecture description and its mapping onto Megatron-Core ``TransformerConfig``s.

``QwenVLArch`` is the small, framework-neutral view of an HF ``Qwen2_5_VLConfig`` (text + vision
dimensions and the special token ids the multimodal forward needs). ``lm_transformer_config`` and
``vision_transformer_config`` turn it into the two mcore configs (language model and vision tower).
The published Qwen2.5-VL-3B and -7B ``config.json`` values are written below (``PUBLISHED_CONFIGS``)
so that real sizes can be built (e.g. on the meta device) without downloading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

_VISION_3B_7B = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}
_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 128000, "model_type": "qwen2_5_vl",
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "use_cache": True,
    "use_sliding_window": False, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}

#: The published HF ``config.json`` of Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2.5-VL-3B": {
        **_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "max_window_layers": 70,
        "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "vocab_size": 151936, "vision_config": {**_VISION_3B_7B, "out_hidden_size": 2048},
    },
    "Qwen2.5-VL-7B": {
        **_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
        "vocab_size": 152064, "vision_config": {**_VISION_3B_7B, "out_hidden_size": 3584},
    },
}


class ModelConfigError(ValueError):
    """An architecture/parallel combination that cannot be built (the message names the numbers)."""


@dataclass(frozen=True)
class VisionArch:
    """Vision tower dimensions (HF ``vision_config``)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        """Per-head channels."""
        return self.hidden_size // self.num_heads

    @property
    def merger_hidden(self) -> int:
        """Width of the patch merger MLP (hidden * merge**2)."""
        return self.hidden_size * self.spatial_merge_size ** 2


@dataclass(frozen=True)
class QwenVLArch:
    """Language model + vision tower dimensions and the multimodal token ids."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision: VisionArch = field(default=None)  # type: ignore[assignment]

    @property
    def head_dim(self) -> int:
        """Per-head channels of the language model."""
        return self.hidden_size // self.num_heads


def arch_from_hf_config(hf_config: Any) -> QwenVLArch:
    """Build a ``QwenVLArch`` from a transformers ``Qwen2_5_VLConfig`` (or a dict of a ``config.json``)."""
    if isinstance(hf_config, dict):
        from transformers import Qwen2_5_VLConfig

        hf_config = Qwen2_5_VLConfig(**hf_config)
    tc, vc = hf_config.text_config, hf_config.vision_config
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    vrope = dict(getattr(vc, "rope_parameters", None) or {})
    mrope = rope.get("mrope_section") or [16, 24, 24]
    vision = VisionArch(
        depth=vc.depth, hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_heads=vc.num_heads,
        out_hidden_size=vc.out_hidden_size, in_channels=vc.in_channels, patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size, spatial_merge_size=vc.spatial_merge_size,
        window_size=vc.window_size, fullatt_block_indexes=tuple(vc.fullatt_block_indexes),
        tokens_per_second=vc.tokens_per_second, rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    return QwenVLArch(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_layers=tc.num_hidden_layers, num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
        rope_theta=float(rope.get("rope_theta", 1e6)), mrope_section=tuple(int(x) for x in mrope),
        rms_norm_eps=float(tc.rms_norm_eps), tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        max_position_embeddings=int(tc.max_position_embeddings), image_token_id=int(hf_config.image_token_id),
        video_token_id=int(hf_config.video_token_id), vision_start_token_id=int(hf_config.vision_start_token_id),
        vision=vision,
    )


def load_arch(hf_dir_or_name: str | Path) -> QwenVLArch:
    """Architecture of an HF directory (its ``config.json``) or of a published name in ``PUBLISHED_CONFIGS``."""
    if str(hf_dir_or_name) in PUBLISHED_CONFIGS:
        return arch_from_hf_config(dict(PUBLISHED_CONFIGS[str(hf_dir_or_name)]))
    path = Path(hf_dir_or_name) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"model.path: no config.json in {hf_dir_or_name} (and not one of {sorted(PUBLISHED_CONFIGS)})")
    return arch_from_hf_config(json.loads(path.read_text()))


def validate_parallel(arch: QwenVLArch, tp: int, pp: int) -> None:
    """Raise ``ModelConfigError`` naming the numbers when the model cannot be split ``tp`` x ``pp`` ways."""
    checks = [
        ("num_attention_heads", arch.num_heads), ("vision num_heads", arch.vision.num_heads),
        ("vocab_size", arch.vocab_size), ("intermediate_size", arch.intermediate_size),
        ("vision intermediate_size", arch.vision.intermediate_size),
        ("vision merger hidden", arch.vision.merger_hidden),
    ]
    for what, n in checks:
        if n % tp:
            raise ModelConfigError(f"{what} ({n}) is not divisible by parallel.tp ({tp}); choose a tp that divides {n}")
    if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
        raise ModelConfigError(f"num_key_value_heads ({arch.num_kv_heads}) and parallel.tp ({tp}): one must divide the other")
    if arch.num_layers % pp:
        raise ModelConfigError(f"num_hidden_layers ({arch.num_layers}) is not divisible by parallel.pp ({pp})")
    if sum(arch.mrope_section) * 2 != arch.head_dim:
        raise ModelConfigError(f"mrope_section {list(arch.mrope_section)} sums to {sum(arch.mrope_section)}, "
                               f"expected head_dim/2 = {arch.head_dim // 2}")


def _common_kwargs(dtype: torch.dtype, tp: int, pp: int, sequence_parallel: bool, use_cpu_init: bool,
                   perform_init: bool) -> dict[str, Any]:
    return dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False, attention_softmax_in_fp32=True, use_cpu_initialization=use_cpu_init,
        perform_initialization=perform_init, init_method_std=0.02, variable_seq_lengths=True,
        deallocate_pipeline_outputs=False, moe_token_dispatcher_type="alltoall",
    )


def lm_transformer_config(arch: QwenVLArch, *, tp: int = 1, pp: int = 1, sequence_parallel: bool = False,
                          dtype: torch.dtype = torch.float32, use_cpu_init: bool = True, perform_init: bool = False,
                          extra: Optional[dict[str, Any]] = None):
    """mcore ``TransformerConfig`` of the language model (GQA, QKV bias, RMSNorm, SwiGLU, M-RoPE)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_parallel(arch, tp, pp)
    kw = _common_kwargs(dtype, tp, pp, sequence_parallel and tp > 1, use_cpu_init, perform_init)
    kw.update(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        layernorm_epsilon=arch.rms_norm_eps, add_bias_linear=False, add_qkv_bias=True,
        mrope_section=list(arch.mrope_section),
    )
    kw.update(extra or {})
    return TransformerConfig(**kw)


def vision_transformer_config(arch: QwenVLArch, *, tp: int = 1, dtype: torch.dtype = torch.float32,
                              use_cpu_init: bool = True, perform_init: bool = False,
                              extra: Optional[dict[str, Any]] = None):
    """mcore ``TransformerConfig`` of the vision tower (MHA with qkv/proj bias, SwiGLU with bias, RMSNorm).

    The tower lives whole on the first pipeline stage, so its config has ``pipeline_model_parallel_size=1``;
    it runs without sequence parallelism (its sequence is the packed patch list of all images).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    v = arch.vision
    kw = _common_kwargs(dtype, tp, 1, False, use_cpu_init, perform_init)
    kw.update(
        num_layers=v.depth, hidden_size=v.hidden_size, ffn_hidden_size=v.intermediate_size,
        num_attention_heads=v.num_heads, num_query_groups=v.num_heads, kv_channels=v.head_dim,
        layernorm_epsilon=v.rms_norm_eps, add_bias_linear=True, add_qkv_bias=True,
    )
    extra = dict(extra or {})
    extra.pop("sequence_parallel", None)
    kw.update(extra)
    return TransformerConfig(**kw)
