"""Layer specs for the Qwen2.5-VL language model and vision tower, and the FP8 settings mapping.

``transformer_impl``:
  * ``local`` — Megatron-Core's own torch modules (CPU and GPU); RMSNorm is ``torch.nn.RMSNorm``
    wrapped so that it also works with sequence parallelism (its weight is tagged
    ``sequence_parallel`` so mcore all-reduces its gradient over TP).
  * ``transformer_engine`` — TE layers (GPU only; TE is imported lazily and a missing TE fails with
    one line). **CI does not run this path** (no GPU / no TE on the CPU machines).

Core attention of the local spec is ``SDPACoreAttention`` (torch SDPA: causal + padding mask for the
language model); the vision tower attends within packed segments (windows or whole images) with
``VisionCoreAttention`` (SDPA per ``cu_seqlens`` segment, as transformers does) in both specs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_papo.models.qwen2_5_vl.config import ModelConfigError


class MegatronRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with mcore's norm constructor signature; works under sequence parallelism.

    mcore's ``WrappedTorchNorm`` refuses ``sequence_parallel``; the norm itself is per-token, so the only
    thing SP needs is that the weight's gradient is all-reduced over TP, which mcore does for params
    tagged ``sequence_parallel=True``.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        super().__init__(hidden_size, eps=eps, device=device, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


class SDPACoreAttention(torch.nn.Module):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention`` with mcore's interface.

    ``forward(query, key, value, attention_mask, ...)`` with ``query`` ``[s, b, heads, d]`` and ``key/value``
    ``[s, b, groups, d]`` (GQA handled by SDPA); returns ``[s, b, heads * d]``. ``attention_mask``:

    * ``None``: causal (language model) or full (vision) attention, per ``causal``;
    * a boolean ``[b or 1, 1, s, s]`` tensor, **True where attention is forbidden** (mcore's convention);
    * a 1-D integer tensor of cumulative segment lengths (``cu_seqlens``, vision tower): attention stays
      within each packed segment (window or image), computed segment by segment like transformers does.
    """

    causal = True

    def __init__(self, config: Any, layer_number: int = 1, softmax_scale: Optional[float] = None, **_: Any) -> None:
        super().__init__()
        self.config = config
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None, attention_bias: Any = None,
                packed_seq_params: Any = None) -> torch.Tensor:
        """SDPA over ``[b, heads, s, d]``."""
        s, b, h, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.config.attention_dropout if self.training else 0.0
        gqa = k.shape[1] != h
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if attention_mask is not None and attention_mask.dim() == 1:
            bounds = attention_mask.tolist()
            parts = [sdpa(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], dropout_p=dropout, scale=self.softmax_scale,
                          enable_gqa=gqa) for a, e in zip(bounds[:-1], bounds[1:])]
            out = torch.cat(parts, dim=2)
        elif attention_mask is not None:
            out = sdpa(q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa)
        else:
            out = sdpa(q, k, v, is_causal=self.causal, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


class VisionCoreAttention(SDPACoreAttention):
    """The vision tower's core attention: non-causal, within ``cu_seqlens`` segments (windows or whole images)."""

    causal = False


def require_transformer_engine() -> None:
    """Import TE or fail with one clear line (the TE path is GPU-only)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception as e:  # TE raises various errors without CUDA
        raise ModelConfigError(
            "model.transformer_impl=transformer_engine needs Transformer Engine (GPU container); it is not importable "
            f"here ({type(e).__name__}). Use model.transformer_impl=local.") from None


def _layer_spec(attn_mask_type: Any, core_attention: Any, linear_col: Any, linear_row: Any, norm: Any):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(linear_qkv=linear_col, core_attention=core_attention,
                                                   linear_proj=linear_row, q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=linear_col, linear_fc2=linear_row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def lm_layer_spec(transformer_impl: str = "local"):
    """Decoder layer spec of the language model (causal self-attention)."""
    from megatron.core.transformer.enums import AttnMaskType

    if transformer_impl == "transformer_engine":
        require_transformer_engine()
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    if transformer_impl != "local":
        raise ModelConfigError(f"model.transformer_impl={transformer_impl!r}: expected local or transformer_engine")
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return _layer_spec(AttnMaskType.causal, SDPACoreAttention, ColumnParallelLinear, RowParallelLinear, MegatronRMSNorm)


def vision_layer_spec(transformer_impl: str = "local"):
    """Vision block spec: non-causal attention within segments (``VisionCoreAttention``), biased linears."""
    from megatron.core.transformer.enums import AttnMaskType

    if transformer_impl == "transformer_engine":
        require_transformer_engine()
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear

        return _layer_spec(AttnMaskType.arbitrary, VisionCoreAttention, TEColumnParallelLinear, TERowParallelLinear, TENorm)
    if transformer_impl != "local":
        raise ModelConfigError(f"model.transformer_impl={transformer_impl!r}: expected local or transformer_engine")
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return _layer_spec(AttnMaskType.arbitrary, VisionCoreAttention, ColumnParallelLinear, RowParallelLinear, MegatronRMSNorm)


def precision_kwargs(model_cfg: Any, num_layers: int, pp: int = 1) -> dict[str, Any]:
    """Map ``ModelConfig`` precision/recompute knobs onto ``TransformerConfig`` keyword arguments.

    FP8 (``model.fp8``) needs ``transformer_impl=transformer_engine``; the first and last
    ``fp8_bf16_first_last_layers`` decoder layers stay in bf16 (not possible with the ``delayed`` recipe).
    The FP8 checks raise early, naming our fields, exactly where mcore 0.16.1's ``TransformerConfig`` would raise
    later (``tests/unit/test_recipe_layouts.py`` checks that both accept and reject the same settings).
    """
    kw: dict[str, Any] = {"transformer_impl": model_cfg.transformer_impl}
    fp8 = getattr(model_cfg, "fp8", None)
    if fp8:
        if model_cfg.transformer_impl != "transformer_engine":
            raise ModelConfigError(f"model.fp8={fp8} needs model.transformer_impl=transformer_engine "
                                   f"(got {model_cfg.transformer_impl})")
        n_bf16 = int(model_cfg.fp8_bf16_first_last_layers)
        if n_bf16 and model_cfg.fp8_recipe == "delayed":
            raise ModelConfigError(
                f"model.fp8_recipe=delayed cannot keep first/last layers in bf16 (model.fp8_bf16_first_last_layers="
                f"{n_bf16}); set it to 0 or use fp8_recipe tensorwise|blockwise|mxfp8")
        if n_bf16 > num_layers // pp:
            raise ModelConfigError(f"model.fp8_bf16_first_last_layers ({n_bf16}) exceeds the layers per pipeline "
                                   f"stage ({num_layers // pp})")
        kw.update(fp8=fp8, fp8_recipe=model_cfg.fp8_recipe, fp8_param=bool(model_cfg.fp8_param_gather),
                  first_last_layers_bf16=n_bf16 > 0, num_layers_at_start_in_bf16=n_bf16,
                  num_layers_at_end_in_bf16=n_bf16)
    elif getattr(model_cfg, "fp8_param_gather", False):
        raise ModelConfigError("model.fp8_param_gather=true needs model.fp8 (e4m3|hybrid)")
    recompute = getattr(model_cfg, "recompute", "none")
    if recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif recompute != "none":
        raise ModelConfigError(f"model.recompute={recompute!r}: expected none|selective|full")
    return kw
