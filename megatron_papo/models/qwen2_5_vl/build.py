"""Build the Qwen2.5-VL mcore model for one pipeline stage, and the forward helpers the trainer uses.

    pg = init_distributed(ParallelConfig(tp=2, pp=1))
    model = build_model(model_cfg, pg, hf_dir=path)          # pre/post_process from pg's PP stage
    load_hf_into_mcore([model], path)
    logits_BSV = forward_logits(model, batch)                 # vocab-parallel [B, S, V/tp], last stage

Under mcore's ``get_forward_backward_func`` schedule use ``make_forward_step(loss_fn)``.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from megatron_papo.models.qwen2_5_vl.config import (
    QwenVLArch,
    lm_transformer_config,
    load_arch,
    vision_transformer_config,
)
from megatron_papo.models.qwen2_5_vl.model import Qwen25VLModel
from megatron_papo.models.qwen2_5_vl.specs import lm_layer_spec, precision_kwargs, vision_layer_spec
from megatron_papo.parallel.training import tag_tensor_parallel_params

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on cuda, float32 on cpu."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _pg_collection(pg: Any) -> Any:
    """Accept megatron_papo's ``ParallelGroups`` (uses ``.mcore``) or an mcore ``ProcessGroupCollection``."""
    return getattr(pg, "mcore", pg)


def transformer_configs(model_cfg: Any, arch: QwenVLArch, *, tp: int, pp: int, sequence_parallel: bool,
                        dtype: torch.dtype, use_cpu_init: bool) -> tuple[Any, Any]:
    """The language model's and the vision tower's mcore ``TransformerConfig`` for ``model_cfg`` at a TP x PP layout
    (precision, FP8 and recompute from :func:`precision_kwargs`; FP8 applies to the language model only)."""
    extra = precision_kwargs(model_cfg, arch.num_layers, pp)
    lm_cfg = lm_transformer_config(arch, tp=tp, pp=pp, sequence_parallel=sequence_parallel, dtype=dtype,
                                   use_cpu_init=use_cpu_init, extra=extra)
    vis_extra = {k: v for k, v in extra.items() if not k.startswith(("fp8", "first_last", "num_layers_at"))}
    vis_cfg = vision_transformer_config(arch, tp=tp, dtype=dtype, use_cpu_init=use_cpu_init, extra=vis_extra)
    return lm_cfg, vis_cfg


def build_model(model_cfg: Any = None, pg: Any = None, *, hf_dir: Optional[str | Path] = None,
                arch: Optional[QwenVLArch] = None, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, sequence_parallel: bool = False,
                dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                meta: bool = False, layer_impl: Optional[str] = None) -> Qwen25VLModel:
    """One pipeline stage of Qwen2.5-VL (vision tower on the first stage), parameters uninitialised.

    Args:
        model_cfg: ``ModelConfig`` (transformer_impl, fp8*, recompute, dtype, freeze_vision_tower); None = defaults.
        pg: ``ParallelGroups`` from ``init_distributed`` (or an mcore ``ProcessGroupCollection``).
        hf_dir / arch: where the architecture comes from (``model_cfg.path`` if neither is given).
        pre_process / post_process: default to first / last PP stage of ``pg``.
        sequence_parallel: shard LM activations over TP (``parallel.sequence_parallel``).
        dtype / device: default from ``model_cfg.dtype`` and ``pg.device``.
        meta: build on the meta device (sizes and parameter counts without memory).
        layer_impl: build the layers from this spec instead of ``model_cfg.transformer_impl`` while keeping the
            TransformerConfigs (FP8 included) of ``model_cfg``: ``local`` lets a machine without Transformer
            Engine build a TE/FP8 recipe's model on the meta device. Training never sets it.
    """
    from megatron_papo.config.model import ModelConfig

    model_cfg = model_cfg or ModelConfig()
    if arch is None:
        arch = load_arch(hf_dir if hf_dir is not None else model_cfg.path)
    pgc = _pg_collection(pg)
    tp, pp = pgc.tp.size(), pgc.pp.size()
    pp_rank = pgc.pp.rank()
    device = device or getattr(pg, "device", None) or torch.device("cpu")
    dtype = dtype or resolve_dtype(model_cfg.dtype, device)
    use_cpu_init = meta or device.type == "cpu"
    lm_cfg, vis_cfg = transformer_configs(model_cfg, arch, tp=tp, pp=pp, sequence_parallel=sequence_parallel,
                                          dtype=dtype, use_cpu_init=use_cpu_init)
    pre = pp_rank == 0 if pre_process is None else pre_process
    post = pp_rank == pp - 1 if post_process is None else post_process
    impl = layer_impl or model_cfg.transformer_impl
    # mcore's parallel layers place their weights on torch.cuda.current_device() themselves; plain torch modules
    # (RMSNorm, the vision patch Conv3d, rotary buffers) follow the default device, so build under the target one
    ctx = torch.device("meta") if meta else (contextlib.nullcontext() if use_cpu_init else torch.device(device))
    with ctx:
        model = Qwen25VLModel(arch, lm_cfg, vis_cfg, lm_layer_spec(impl), vision_layer_spec(impl), pre_process=pre,
                              post_process=post, pg_collection=pgc, freeze_vision_tower=model_cfg.freeze_vision_tower)
    tag_tensor_parallel_params(model)
    return model


def batch_to_model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's forward keyword arguments from a batch dict (extra keys ignored)."""
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "image_index",
            "segment_ids")
    return {k: batch.get(k) for k in keys}


def forward_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Vocab-parallel logits ``[B, S, V/tp]`` (last stage) or hidden states (other stages) of a batch.

    ``batch``: ``input_ids [B,S]``, ``attention_mask [B,S]`` (optional), ``position_ids [3,B,S]`` (optional,
    computed like transformers when absent), ``pixel_values``, ``image_grid_thw`` (optional), ``segment_ids``
    (optional, packed rows: 0 = padding, k > 0 = k-th sample of the row).
    """
    return model(**batch_to_model_inputs(batch))


def make_forward_step(loss_fn: Callable[[dict[str, Any], torch.Tensor], tuple[torch.Tensor, dict[str, Any]]],
                      ) -> Callable[[Iterator[dict[str, Any]], Any], tuple[torch.Tensor, Callable]]:
    """A ``forward_step_func`` for mcore's ``get_forward_backward_func``.

    ``loss_fn(batch, logits_BSV) -> (loss, metrics)`` runs on the last stage; the batch (same on every
    stage: position ids and the padding mask are needed everywhere) comes from the data iterator.
    """
    def forward_step(data_iterator: Iterator[dict[str, Any]], model: Any) -> tuple[torch.Tensor, Callable]:
        batch = next(data_iterator)
        out = forward_logits(model, batch)
        return out, partial(loss_fn, batch)

    return forward_step
