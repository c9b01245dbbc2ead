"""CPU plumbing: batch-invariant numerics for SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``).

Why: a request's log-probs on the CPU engine depended on which other requests shared its batches. MKL's fp32
GEMM picks its kernel by the row count (``F.linear`` of one row differs in the last bits from the same row
inside 2 or 40 rows), and SGLang's scheduler batches whatever has arrived, so the same request gave log-probs
differing by ~5e-7 from call to call (measured: 25 of 100 seeded samples, identical tokens) — and the
rollout-correction weights (TIS/MIS) computed from them, so an overlapped run with TIS did not repeat itself.
GPU engines get the same property from SGLang's ``enable_deterministic_inference`` (batch-invariant kernels),
which SGLang refuses with the CPU attention backend.

What (applied in each SGLang scheduler process, together with ``seeded.py``; nothing else changes):

1. ``torch.nn.functional.linear`` on CPU floating tensors is :func:`invariant_linear`: one ``bmm`` whose every
   batch entry is a single row times the weight, so each row's result is the same computation whatever the
   number of rows around it. It covers every SGLang linear layer (``UnquantizedLinearMethod`` and the
   vision patch embedding call ``F.linear``).
2. The lm-head (``LogitsProcessor._compute_lm_head``, a ``torch.matmul``) of a plain weight is
   :func:`invariant_linear` too.
3. ``VisionSdpaAttention`` attends within each ``cu_seqlens`` segment (an image or a window) by itself instead
   of over every image of the batch at once under a block-diagonal mask, so an image's features no longer
   depend on the other images encoded with it.

The text attention of ``torch_native`` already runs per request at fixed shapes (extend pads its queries to the
full sequence), so it needs nothing. Cost: ``bmm`` of single rows was 2-4x slower than one GEMM at the tiny
model's sizes in a microbenchmark on a loaded 2-core machine; CPU engine runs (tests, the main job, CPU runs of
``tools/bench/rollout_fleet.py``) pay it, GPU engines never take this path.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

_PATCHED = False
_ORIGINAL_LINEAR: Callable[..., torch.Tensor] = torch.nn.functional.linear


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` where row ``i`` of the result depends only on row ``i`` of ``x``, bit for bit.

    CPU floating tensors only; anything else (another device, integer or quantized tensors) goes to the
    original ``F.linear``.
    """
    if x.device.type != "cpu" or not x.is_floating_point() or weight.dim() != 2 or x.numel() == 0:
        return _ORIGINAL_LINEAR(x, weight, bias)
    lead, k, n = x.shape[:-1], x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, 1, k)
    out = torch.bmm(rows, weight.t().unsqueeze(0).expand(rows.shape[0], k, n)).reshape(*lead, n)
    return out + bias if bias is not None else out


def _lm_head(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def compute_lm_head(self: Any, hidden_states: torch.Tensor, lm_head: Any, embedding_bias: Any = None,
                        **kwargs: Any) -> torch.Tensor:
        plain = (getattr(lm_head, "quant_method", None) is None or type(lm_head.quant_method).__name__
                 in ("UnquantizedEmbeddingMethod", "UnquantizedLinearMethod"))
        if (plain and hasattr(lm_head, "weight") and not hasattr(lm_head, "set_lora") and embedding_bias is None
                and hidden_states.device.type == "cpu" and not self.use_fp32_lm_head):
            return invariant_linear(hidden_states.to(lm_head.weight.dtype), lm_head.weight)
        return original(self, hidden_states, lm_head, embedding_bias, **kwargs)

    return compute_lm_head


def _per_segment_vision_sdpa(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bsz: int,
                cu_seqlens: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if (bsz != 1 or cu_seqlens is None or attention_mask is not None or self.softmax_in_single_precision
                or q.device.type != "cpu" or self.num_heads != self.num_kv_heads):
            return original(self, q, k, v, bsz, cu_seqlens=cu_seqlens, attention_mask=attention_mask, **kwargs)
        bounds = cu_seqlens.tolist()
        out = torch.empty_like(q)
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end <= start:
                continue
            seg = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # [1, h, len, d]
            o = torch.nn.functional.scaled_dot_product_attention(*seg, dropout_p=0.0, is_causal=False,
                                                                 scale=self.scale)
            out[start:end] = o.squeeze(0).transpose(0, 1)
        return out

    return forward


def patch_sglang() -> bool:
    """Apply the three changes above in this process (idempotent); returns True when applied now."""
    global _PATCHED
    if _PATCHED:
        return False
    from sglang.srt.layers.attention.vision import VisionSdpaAttention
    from sglang.srt.layers.logits_processor import LogitsProcessor

    torch.nn.functional.linear = invariant_linear
    LogitsProcessor._compute_lm_head = _lm_head(LogitsProcessor._compute_lm_head)
    VisionSdpaAttention.forward = _per_segment_vision_sdpa(VisionSdpaAttention.forward)
    _PATCHED = True
    return True
