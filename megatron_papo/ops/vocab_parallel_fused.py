"""Optional fused (``torch.compile``) block kernels behind :func:`megatron_papo.ops.vocab_parallel.token_stats`.

Same math and the same payload columns as the eager path in ``vocab_parallel.py``, written as pure
functions of one block of token rows so that inductor can fuse each view's passes into a few kernels
(on GPU: no ``[rows, V_local]`` temporaries between them). Off by default: set
``MEGATRON_PAPO_VP_FUSED=1`` to use it for CUDA inputs (``all`` also compiles on CPU, for tests).

NOT exercised on a GPU by CI: the CPU test (``tests/unit/test_vocab_parallel_fused.py``, slow) checks
the compiled functions against the float64 reference on CPU only. The eager path stays the reference
and the CPU path; measure on a GPU before turning this on.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Callable, Optional

import torch

# Keep in sync with vocab_parallel.py (column layout of the SUM payload and the clamp floors).
_S, _C, _UY, _EU, _SR, _CR, _UYR, _EUR, _EUX = range(9)
_FWD_FLOOR = torch.finfo(torch.float32).min
_BWD_FLOOR = -1e30


def enabled(x: torch.Tensor) -> bool:
    """Whether ``token_stats`` should use the compiled blocks for ``x`` (env ``MEGATRON_PAPO_VP_FUSED``)."""
    mode = os.environ.get("MEGATRON_PAPO_VP_FUSED", "0")
    return mode == "all" or (mode == "1" and x.is_cuda)


def _view_sums(x: torch.Tensor, m: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    u = ((x.float() - m.unsqueeze(-1)) / temperature).clamp(min=_FWD_FLOOR)
    e = torch.exp(u)
    total = e.sum(-1)
    rest = torch.frac(e).sum(-1)
    return u, e, rest, torch.round(total - rest)


def fwd_block(x: torch.Tensor, xr: Optional[torch.Tensor], m: torch.Tensor, mr: Optional[torch.Tensor],
              on_shard: torch.Tensor, idx: torch.Tensor, temperature: float, want_eu: bool, want_kl: bool,
              want_ref_ent: bool) -> torch.Tensor:
    """The ``[rows, 9]`` local partial sums of one block (see the payload layout in ``vocab_parallel.py``)."""
    zero = torch.zeros_like(m)
    u, e, rest, cnt = _view_sums(x, m, temperature)
    cols = [zero] * 9
    cols[_S], cols[_C] = rest, cnt
    cols[_UY] = torch.where(on_shard, u.gather(-1, idx.unsqueeze(-1)).squeeze(-1), 0.0)
    if want_eu:
        cols[_EU] = (e * u).sum(-1)
    if xr is not None:
        ur, er, rest_r, cnt_r = _view_sums(xr, mr, temperature)
        cols[_SR], cols[_CR] = rest_r, cnt_r
        cols[_UYR] = torch.where(on_shard, ur.gather(-1, idx.unsqueeze(-1)).squeeze(-1), 0.0)
        if want_kl:
            cols[_EUX] = (e * ur).sum(-1)
        if want_ref_ent:
            cols[_EUR] = (er * ur).sum(-1)
    return torch.stack(cols, -1)


def bwd_block(x: torch.Tensor, xr: Optional[torch.Tensor], m: torch.Tensor, mr: Optional[torch.Tensor],
              log_s: torch.Tensor, log_sr: Optional[torch.Tensor], on_shard: torch.Tensor, idx: torch.Tensor,
              coef: torch.Tensor, temperature: float, need_x: bool, need_xr: bool, want_kl: bool
              ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of one block in the inputs' dtype. ``coef`` is ``[rows, 8]``: for the logits
    ``(a, b, c, g_lp)`` with ``dz = p * (a log p + b log q + c) + g_lp onehot``, and for the ref logits
    ``(a', c', d', g_rlp)`` with ``dz' = q * (a' log q + c') + d' p + g_rlp onehot``."""
    logp = ((x.float() - m.unsqueeze(-1)) / temperature).clamp(min=_BWD_FLOOR) - log_s.unsqueeze(-1)
    p = torch.exp(logp)
    logq = None
    if xr is not None and (want_kl or need_xr):
        logq = ((xr.float() - mr.unsqueeze(-1)) / temperature).clamp(min=_BWD_FLOOR) - log_sr.unsqueeze(-1)
    col = [coef[:, i].unsqueeze(-1) for i in range(8)]
    gx = gxr = None
    if need_x:
        inner = col[0] * logp + col[2]
        if want_kl:
            inner = inner + col[1] * logq
        g = (p * inner).scatter_add(-1, idx.unsqueeze(-1), torch.where(on_shard, coef[:, 3], 0.0).unsqueeze(-1))
        gx = (g / temperature).to(x.dtype)
    if need_xr:
        g = torch.exp(logq) * (col[4] * logq + col[5]) + col[6] * p
        g = g.scatter_add(-1, idx.unsqueeze(-1), torch.where(on_shard, coef[:, 7], 0.0).unsqueeze(-1))
        gxr = (g / temperature).to(xr.dtype)
    return gx, gxr


@cache
def compiled(name: str) -> Callable:
    """``torch.compile`` of :func:`fwd_block` or :func:`bwd_block` (compiled once per process, dynamic rows)."""
    return torch.compile({"fwd": fwd_block, "bwd": bwd_block}[name], dynamic=True)
