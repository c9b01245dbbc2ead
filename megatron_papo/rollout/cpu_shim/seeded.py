"""CPU plumbing: honour SGLang's per-request ``sampling_seed`` on the CPU engine (``SGLANG_USE_CPU_ENGINE=1``).

Why: SGLang 0.5.23 fills ``SamplingBatchInfo.sampling_seed`` only under ``enable_deterministic_inference``,
which it refuses with ``attention_backend="torch_native"`` (the only CPU backend here), and its seeded sampler
on CPU calls ``torch.ops.sgl_kernel.murmur_hash32_cpu`` — a kernel of the CPU build of ``sgl_kernel``, which is
not on PyPI (our ``sgl_kernel`` stand-in has no kernels). Without seeds the CPU engine samples from its own RNG
stream, so a resumed run cannot repeat the rollouts of an uninterrupted one.

What (applied in each SGLang scheduler process, nothing else changes):

1. ``SamplingBatchInfo.from_schedule_batch`` also fills ``sampling_seed`` without deterministic inference:
   a request's ``sampling_seed``, or for a request without one a seed drawn from the scheduler's torch RNG
   (seeded by ``random_seed``), so unseeded requests keep sampling randomly and batches always merge.
2. ``murmur_hash32`` (the per-(seed, position, token) hash behind SGLang's ``multinomial_with_seed``) is
   :func:`murmur_hash32_torch`: the same MurmurHash3_x86_32 of the 16-byte key (seed, position, token id)
   as SGLang's Triton kernel, in plain int64 torch ops.
3. ``multinomial_with_seed`` runs eagerly (upstream wraps it in ``torch.compile``; on CPU that would need an
   inductor C++ build in every scheduler process).

SGLang's own seeded path (Gumbel-max with that hash, ``sampler.multinomial_with_seed``) then draws token t of
sample k at position p from ``argmax(log p_t + Gumbel(hash(seed_k, p, t)))``: a function of the seed, the
position and the probabilities only — not of the batch, the request order or what the engine sampled before.
On CPU ``torch_native`` attention is deterministic for identical batches, so a resumed run repeats the
uninterrupted one. Installed by :func:`install` (the SGLang host calls it before creating ``sglang.Engine``);
GPU engines never take this path (they use ``enable_deterministic_inference``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

_M32 = 0xFFFFFFFF
_PATCHED = False


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``(a * c) mod 2**32`` for ``0 <= a < 2**32`` without int64 overflow (the constant split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _M32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _rotl32(_mul32(k, 0xCC9E2D51), 15)
    k = _mul32(k, 0x1B873593)
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def murmur_hash32_torch(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` hashes (int64 holding uint32 values) of (seed[i], positions[i], col_indices[j]): SGLang's
    ``murmur_hash32`` (MurmurHash3_x86_32 of the little-endian 16-byte key seed(8) | position(4) | col(4),
    hash seed 0), written with int64 torch ops so it runs on any device."""
    if seed.shape != positions.shape or seed.dim() != 1 or col_indices.dim() != 1:
        raise ValueError(f"murmur_hash32: seed {tuple(seed.shape)} and positions {tuple(positions.shape)} must be "
                         f"equal 1-D shapes, col_indices 1-D (got {tuple(col_indices.shape)})")
    s = seed.to(torch.int64)
    lo, hi = (s & _M32).view(-1, 1), ((s >> 32) & _M32).view(-1, 1)
    pos = (positions.to(torch.int64) & _M32).view(-1, 1)
    col = (col_indices.to(torch.int64) & _M32).view(1, -1)
    h = torch.zeros_like(lo)
    for block in (lo, hi, pos):
        h = _mix(h, block)
    h = _mix(h.expand(-1, col.shape[1]), col.expand(h.shape[0], -1))
    return _fmix(h ^ 16)


def _seeded_from_schedule_batch(original: Any) -> Any:
    def from_schedule_batch(cls: Any, batch: Any, vocab_size: int) -> Any:
        info = original.__func__(cls, batch, vocab_size)
        if info.sampling_seed is None:
            seeds = [r.sampling_params.sampling_seed if r.sampling_params.sampling_seed is not None
                     else int(torch.randint(0, 2**62, (1,)).item()) for r in batch.reqs]
            info.sampling_seed = torch.tensor(seeds, dtype=torch.int64, device=info.temperatures.device)
        return info

    return classmethod(from_schedule_batch)


def patch_sglang() -> bool:
    """Apply the three changes above in this process (idempotent); returns True when applied now."""
    global _PATCHED
    if _PATCHED:
        return False
    from sglang.srt.layers import sampler
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    SamplingBatchInfo.from_schedule_batch = _seeded_from_schedule_batch(SamplingBatchInfo.__dict__["from_schedule_batch"])
    sampler.murmur_hash32 = murmur_hash32_torch
    eager = getattr(sampler.multinomial_with_seed, "_torchdynamo_orig_callable", None)
    if eager is not None:
        sampler.multinomial_with_seed = eager
    _PATCHED = True
    return True


def run_scheduler_process(*args: Any, **kwargs: Any) -> Any:
    """SGLang's scheduler entry point with :func:`patch_sglang` applied first (a spawned process: importable
    by name, so ``sglang.Engine.run_scheduler_process_func`` can point here). Batch-invariant numerics
    (``batch_invariant.py``) are applied with it: seeds fix the tokens, invariance fixes their log-probs; and a cache
    flush collects only the young garbage generations (``flush_gc.py``)."""
    from megatron_papo.rollout.cpu_shim import batch_invariant, flush_gc

    patch_sglang()
    batch_invariant.patch_sglang()
    flush_gc.patch_sglang()  # a cache flush walks the young generations only, not the whole heap
    from sglang.srt.managers.scheduler import run_scheduler_process as upstream

    return upstream(*args, **kwargs)


def install() -> bool:
    """In the process that creates ``sglang.Engine`` (CPU only): its schedulers start through
    :func:`run_scheduler_process`, forked from this process (``fork_start.py``), and multimodal features reach them
    inside the request (``mm_transport.py``). Returns False (and changes nothing) unless ``SGLANG_USE_CPU_ENGINE=1``."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return False
    from sglang.srt.entrypoints.engine import Engine

    from megatron_papo.rollout.cpu_shim import dispatch, fork_start, mm_transport

    Engine.run_scheduler_process_func = staticmethod(run_scheduler_process)
    fork_start.install()  # the schedulers fork from this process instead of importing SGLang again
    mm_transport.install()  # pixel values pickled with the request, not one shared-memory segment per request
    dispatch.install()  # a prompt's template built once, not per seeded copy; a batch sent as one message
    return True
