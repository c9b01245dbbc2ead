"""Config section ``model``: which Qwen2.5-VL to build and how (layer implementation, precision)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_papo.config.base import field


@dataclass
class TinyModelConfig:
    """Dimensions of the embedded tiny Qwen2.5-VL built offline when ``model.path`` is ``tiny``."""

    seed: int = field(0, help="seed of the random init and the tokenizer build")
    vocab_size: int = field(512, help="tokenizer + embedding size (incl. special and filler tokens)")
    hidden_size: int = field(128, help="text hidden size")
    intermediate_size: int = field(256, help="text MLP size")
    num_layers: int = field(2, help="text decoder layers")
    num_heads: int = field(4, help="text attention heads")
    num_kv_heads: int = field(2, help="text KV heads (GQA)")
    vision_depth: int = field(2, help="vision transformer blocks")
    vision_hidden_size: int = field(64, help="vision hidden size")
    vision_heads: int = field(4, help="vision attention heads")
    tie_word_embeddings: bool = field(True, help="share input embedding and LM head (3B ties, 7B does not)")


@dataclass
class ModelConfig:
    """The actor/reference model."""

    path: str = field("tiny", help="HF directory of a Qwen2.5-VL checkpoint, or 'tiny' to build the embedded tiny one")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, help="tiny model dimensions (path=tiny)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="parameter/compute dtype; auto: bfloat16 on cuda, float32 on cpu")
    transformer_impl: Literal["local", "transformer_engine"] = field(
        "local", help="layer spec: local torch modules (CPU and GPU) or Transformer Engine (GPU only)")
    fp8: Optional[Literal["e4m3", "hybrid"]] = field(None, help="FP8 format (transformer_engine only); null = off")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = field(
        "tensorwise", help="FP8 scaling recipe: tensorwise (per-tensor current scaling), delayed (no bf16 "
        "first/last layers), blockwise (Hopper+), mxfp8 (Blackwell)")
    fp8_param_gather: bool = field(False, help="keep FP8 copies of params for the all-gather (distributed optimizer)")
    fp8_bf16_first_last_layers: int = field(1, help="number of first and last layers kept in bf16 under FP8")
    recompute: Literal["none", "selective", "full"] = field("none", help="activation recomputation")
    logits_chunk_size: int = field(
        2048, help="loss kernel (ops/vocab_parallel.token_stats): tokens per block of its fp32 [tokens, vocab/tp] work "
        "buffers; 2048 x 152k vocab = 1.16 GiB per buffer at TP=1 (0.58 GiB at TP=2). 0 = a micro-batch at once")
    offload_ref: bool = field(False, help="colocated GPUs: keep the reference model in host memory except during "
                              "its log-prob pass (no effect on CPU)")
    freeze_vision_tower: bool = field(False, help="do not train the vision tower (PAPO trains it)")
