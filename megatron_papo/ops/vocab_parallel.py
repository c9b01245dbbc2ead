"""Per-token log-prob, entropy and exact KL of one or two views over a vocabulary split across ranks.

PAPO needs, per response token, ``log p(y)`` under the original view, ``log q(y)`` under the
masked view, both entropies and ``KL(p || q)`` over the *full* vocabulary, while each rank of the
tensor-parallel ``group`` holds only its slice of the logits: rank ``r`` holds vocab ids
``[r*V_local, (r+1)*V_local)`` (mcore's ``VocabUtility`` layout). ``token_stats`` computes all of
them without gathering the vocabulary.

Math (per token, ``z = logits / T`` and ``z' = ref_logits / T``, ``m`` / ``m'`` the global maxima of
the raw logits, ``u = (x - m) / T <= 0``, ``e = exp(u)``, ``S = sum e``, ``p = e / S``)::

    log p(y) = u_y - log S
    H(p)     = log S - (sum e*u) / S                    (two non-negative terms: no cancellation)
    KL(p||q) = (sum e*(u - u')) / S - log S + log S'

Backward (no communication; every global quantity is a saved per-token scalar)::

    d log p(y) / dz = onehot(y) - p
    d H / dz        = -p * (log p + H)
    d KL / dz       = p * ((log p - log q) - KL)
    d KL / dz'      = q - p
    d / dx          = (d / dz) / T

Communication. Exactly two all-reduces per call, whatever the outputs and however many chunks:
one MAX of the stacked raw maxima ``[N, n_views]`` and one SUM of the stacked local partial sums
``[N, 9]`` (a fixed payload; unrequested columns stay 0). The columns each output needs: ``logprob``
3 (``S`` without the max entries, how many entries hold the global max, ``u_y``), ``entropy`` +1
(``sum e*u``), ``ref_logprob`` +3 (the same for ``z'``), ``ref_entropy`` +1, ``kl`` +1 (``sum e*u'``;
it also needs ``sum e*u``). So per token at most 9 + 2 floats cross ranks, in two collectives. In
all-reduce counts: ``logprob`` alone costs 2 (MAX + SUM; mcore's vocab-parallel CE uses 3), and
``entropy``, ``ref_logprob``, ``ref_entropy`` and ``kl`` add 0 each (they ride in the same two).
Counting the max entries exactly (they contribute exactly 1 each) gives ``log S = log1p(rest)`` and
keeps near one-hot log-probs and entropies accurate to fp32 relative precision.
Ignored tokens (label ``-100``) are computed like the others but their outputs and gradients are 0.

Memory. Work proceeds over blocks of token rows: at most ``chunk_size`` rows (default: all), and on
CPU additionally at most ~8 MiB of fp32 per work buffer, which keeps every pass of a block in cache and
is several times faster than whole-shard passes (fresh multi-GiB temporaries cost page faults). The
forward holds two fp32 ``[rows, V_local]`` work buffers for both views together; the backward
recomputes the softmax from the saved inputs (no softmax is saved, only per-token scalars) and holds
one fp32 buffer per view besides the gradients it returns (plus one fp32 staging buffer for bf16/fp16
gradients). Unchunked on GPU that is at most one fp32 local shard per view (1.5 with bf16 gradients);
with chunks or on CPU it is ``rows / N`` of that. Inputs are never modified in place; bf16/fp16 inputs
are upcast block by block and accumulated in fp32. All outputs are fp32.

This eager torch code is the reference and the CPU path. ``vocab_parallel_fused.py`` holds an optional
``torch.compile`` version of the block kernels for CUDA, off unless ``MEGATRON_PAPO_VP_FUSED=1``; CI
checks it only on CPU, never on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_papo.ops import vocab_parallel_fused as _fused

IGNORE_INDEX = -100

# Column layout of the stacked SUM all-reduce payload.
_S, _C, _UY, _EU, _SR, _CR, _UYR, _EUR, _EUX = range(9)
_NCOL = 9
_FWD_FLOOR = torch.finfo(torch.float32).min
_BWD_FLOOR = -1e30
_CPU_BLOCK_BYTES = 8 << 20  # fp32 bytes per CPU work buffer: keeps a block's passes in cache


@dataclass
class TokenStats:
    """Per-token results of :func:`token_stats`; float32 with the labels' shape, ``None`` if not requested."""

    logprob: torch.Tensor
    ref_logprob: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    ref_entropy: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None


def _world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) of ``group``; (0, 1) when there is no group or no process group at all."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup], world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _block_rows(n: int, v_local: int, chunk_size: Optional[int], device: torch.device) -> int:
    """Rows per work block: ``chunk_size`` if given, capped on CPU so a block stays cache-sized (~8 MiB fp32)."""
    rows = chunk_size or n
    if device.type == "cpu":
        rows = min(rows, max(1, _CPU_BLOCK_BYTES // (4 * v_local)))
    return max(1, min(rows, n))


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _shifted(x_c: torch.Tensor, m_c: torch.Tensor, temperature: float, out: torch.Tensor,
             floor: float = _FWD_FLOOR) -> torch.Tensor:
    """``u = (x - m) / T`` in fp32, written into the work buffer ``out`` (never into the input).

    ``u`` is clamped from below at ``floor`` so that ``-inf`` logits give finite products: in the forward
    at the most negative float (``exp(u) * u`` stays 0 and a label's own ``u`` is exact down to there), in
    the backward at ``_BWD_FLOOR = -1e30``: far below any finite logit gap, so no ``log p`` or ``log q``
    of a finite logit changes, yet ``log p * g`` stays finite for upstream gradients ``|g| < 3e8`` (at
    the most negative float it would overflow to -inf and ``p * (inf - inf)`` would give NaN).
    """
    u = torch.sub(x_c, m_c.unsqueeze(-1), out=out[: x_c.shape[0]])  # bf16 - fp32 promotes to fp32
    if temperature != 1.0:
        u.div_(temperature)
    return u.clamp_(min=floor)


def _buffers(count: int, rows: int, v_local: int, like: torch.Tensor) -> list[torch.Tensor]:
    """``count`` reusable fp32 ``[rows, V_local]`` work buffers (reuse avoids re-faulting fresh pages per block)."""
    return [torch.empty(rows, v_local, dtype=torch.float32, device=like.device) for _ in range(count)]


def _sum_split_top(eu: torch.Tensor, tmp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums of ``eu = exp(u)`` split as (sum of entries below 1, number of entries equal to 1); uses ``tmp``.

    Entries at the global max are exactly 1; keeping them out of the fp32 sum and counting them instead
    lets ``log S = log1p(rest + count - 1)`` resolve ``S - 1`` far below fp32's epsilon.
    """
    total = eu.sum(-1)
    rest = torch.frac(eu, out=tmp[: eu.shape[0]]).sum(-1)  # frac(1) = 0, frac(e) = e for e < 1
    return rest, (total - rest).round_()  # the count is an integer; total's rounding error is << 0.5


def _log_sum(rest: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log S, S)`` for ``S = count + rest`` (``count >= 1`` global maxima, each contributing exactly 1)."""
    extra = rest + (count - 1)
    return torch.log1p(extra), extra + 1


def _local_label(labels: torch.Tensor, vocab_start: int, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of tokens whose label lives on this shard, the label's local index clamped into range)."""
    local = labels - vocab_start
    on_shard = (local >= 0) & (local < v_local)
    return on_shard, local.clamp(0, v_local - 1)


class _TokenStatsFn(torch.autograd.Function):
    """Forward: the per-token scalars (two all-reduces). Backward: analytic, communication-free, chunked."""

    @staticmethod
    def forward(ctx, x, xr, labels, group, temperature, want_ent, want_ref_ent, want_kl, ref_grad, chunk_size):
        rank, world = _world(group)
        n, v_local = x.shape
        has_ref = xr is not None
        on_shard, idx = _local_label(labels, rank * v_local, v_local)

        # One MAX all-reduce for the raw maxima of both views.
        maxes = [x.detach().amax(-1).float()] + ([xr.detach().amax(-1).float()] if has_ref else [])
        m_all = _all_reduce(torch.stack(maxes, -1), dist.ReduceOp.MAX, group, world)
        m, mr = m_all[:, 0].contiguous(), (m_all[:, 1].contiguous() if has_ref else None)

        # Local partial sums, block by block, into one payload; then one SUM all-reduce.
        part = torch.zeros(n, _NCOL, dtype=torch.float32, device=x.device)
        rows = _block_rows(n, v_local, chunk_size, x.device)
        fused = _fused.enabled(x)
        buf_a, buf_b = (None, None) if fused else _buffers(2, rows, v_local, x)
        for s, e in _chunks(n, rows) if fused else ():
            part[s:e] = _fused.compiled("fwd")(
                x[s:e], xr[s:e] if has_ref else None, m[s:e], mr[s:e] if has_ref else None, on_shard[s:e], idx[s:e],
                temperature, want_ent or want_kl, want_kl, want_ref_ent)
        for s, e in _chunks(n, rows) if not fused else ():  # two buffers; each step below says what it overwrites
            u = _shifted(x[s:e], m[s:e], temperature, buf_a)
            part[s:e, _UY] = torch.where(on_shard[s:e], u.gather(-1, idx[s:e, None]).squeeze(-1), 0.0)
            eu = torch.exp(u, out=buf_b[: e - s])
            if want_ent or want_kl:
                part[s:e, _EU] = u.mul_(eu).sum(-1)  # u -> e*u
            part[s:e, _S], part[s:e, _C] = _sum_split_top(eu, buf_a)
            if has_ref:
                ur = _shifted(xr[s:e], mr[s:e], temperature, buf_a)
                part[s:e, _UYR] = torch.where(on_shard[s:e], ur.gather(-1, idx[s:e, None]).squeeze(-1), 0.0)
                if want_kl:
                    part[s:e, _EUX] = eu.mul_(ur).sum(-1)  # e -> e*u'
                eu = torch.exp(ur, out=eu)
                if want_ref_ent:
                    part[s:e, _EUR] = ur.mul_(eu).sum(-1)  # u' -> e'*u'
                part[s:e, _SR], part[s:e, _CR] = _sum_split_top(eu, buf_a)
        del buf_a, buf_b
        tot = _all_reduce(part, dist.ReduceOp.SUM, group, world)

        valid = labels != IGNORE_INDEX
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        log_s, s_tot = _log_sum(tot[:, _S], tot[:, _C])
        logprob = torch.where(valid, tot[:, _UY] - log_s, zero)
        ent = torch.where(valid, log_s - tot[:, _EU] / s_tot, zero) if want_ent else zero.new_zeros(0)
        log_sr, sr_tot = _log_sum(tot[:, _SR], tot[:, _CR]) if has_ref else (None, None)
        ref_lp = torch.where(valid, tot[:, _UYR] - log_sr, zero) if has_ref else zero.new_zeros(0)
        ref_ent = torch.where(valid, log_sr - tot[:, _EUR] / sr_tot, zero) if want_ref_ent else zero.new_zeros(0)
        kl = (torch.where(valid, (tot[:, _EU] - tot[:, _EUX]) / s_tot - log_s + log_sr, zero)
              if want_kl else zero.new_zeros(0))

        ctx.save_for_backward(x, xr, labels, m, mr, log_s, log_sr, ent, ref_ent, kl)
        ctx.cfg = (rank, temperature, chunk_size, want_ent, want_ref_ent, want_kl)
        if has_ref and not ref_grad:
            ctx.mark_non_differentiable(ref_lp, ref_ent)
        return logprob, ent, ref_lp, ref_ent, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent, g_rlp, g_rent, g_kl):
        x, xr, labels, m, mr, log_s, log_sr, ent, ref_ent, kl = ctx.saved_tensors
        rank, temperature, chunk_size, want_ent, want_ref_ent, want_kl = ctx.cfg
        need_x, need_xr = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v_local = x.shape
        valid = (labels != IGNORE_INDEX).float()
        on_shard, idx = _local_label(labels, rank * v_local, v_local)
        g_lp = g_lp.float() * valid
        g_ent = g_ent.float() * valid if want_ent else torch.zeros_like(g_lp)
        g_kl = g_kl.float() * valid if want_kl else torch.zeros_like(g_lp)
        has_ref = xr is not None
        g_rlp = g_rlp.float() * valid if has_ref else torch.zeros_like(g_lp)
        g_rent = g_rent.float() * valid if want_ref_ent else torch.zeros_like(g_lp)
        ent_ = ent if want_ent else torch.zeros_like(g_lp)
        kl_ = kl if want_kl else torch.zeros_like(g_lp)
        rent_ = ref_ent if want_ref_ent else torch.zeros_like(g_lp)
        need_q = has_ref and (want_kl or need_xr)
        # dz  = p * ((g_kl - g_ent) * log p - g_kl * log q + c) + g_lp * onehot,   c  = -g_lp - g_ent*H - g_kl*KL
        # dz' = q * (-g_rent * log q + c') - g_kl * p + g_rlp * onehot,             c' = -g_rlp - g_rent*H' + g_kl
        c = -g_lp - g_ent * ent_ - g_kl * kl_
        cr = -g_rlp - g_rent * rent_ + g_kl

        gx = torch.empty_like(x) if need_x else None
        gxr = torch.empty_like(xr) if need_xr else None
        rows = _block_rows(n, v_local, chunk_size, x.device)
        if _fused.enabled(x):
            coef = torch.stack([g_kl - g_ent, -g_kl, c, g_lp, -g_rent, cr, -g_kl, g_rlp], -1)
            for s, e in _chunks(n, rows):
                gb, gbr = _fused.compiled("bwd")(
                    x[s:e], xr[s:e] if need_q else None, m[s:e], mr[s:e] if need_q else None, log_s[s:e],
                    log_sr[s:e] if need_q else None, on_shard[s:e], idx[s:e], coef[s:e], temperature, need_x, need_xr,
                    want_kl)
                if need_x:
                    gx[s:e].copy_(gb)
                if need_xr:
                    gxr[s:e].copy_(gbr)
            return gx, gxr, None, None, None, None, None, None, None, None
        buf_p, buf_q = _buffers(2 if need_q else 1, rows, v_local, x) + ([] if need_q else [None])
        stage = _buffers(1, rows, v_local, x)[0] if x.dtype != torch.float32 else None
        for s, e in _chunks(n, rows):
            sl = slice(s, e)
            logp = _shifted(x[sl], m[sl], temperature, buf_p, _BWD_FLOOR).sub_(log_s[sl, None])
            logq = _shifted(xr[sl], mr[sl], temperature, buf_q, _BWD_FLOOR).sub_(log_sr[sl, None]) if need_q else None
            if need_x:
                buf = torch.mul(logp, (g_kl[sl] - g_ent[sl]).unsqueeze(-1), out=_out_buf(gx, sl, stage))
                if want_kl:
                    buf.addcmul_(logq, -g_kl[sl].unsqueeze(-1))
                buf.add_(c[sl].unsqueeze(-1))
                logp.exp_()  # now p
                buf.mul_(logp)
                _add_onehot(buf, on_shard[sl], idx[sl], g_lp[sl])
                _store(gx[sl], buf, temperature)
            else:
                logp.exp_()
            if need_xr:
                buf = torch.mul(logq, (-g_rent[sl]).unsqueeze(-1), out=_out_buf(gxr, sl, stage))
                buf.add_(cr[sl].unsqueeze(-1))
                buf.mul_(logq.exp_())
                buf.addcmul_(logp, -g_kl[sl].unsqueeze(-1))
                _add_onehot(buf, on_shard[sl], idx[sl], g_rlp[sl])
                _store(gxr[sl], buf, temperature)
        return gx, gxr, None, None, None, None, None, None, None, None


def _add_onehot(buf: torch.Tensor, on_shard: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> None:
    """``buf[i, idx[i]] += g[i]`` for rows whose label lives on this shard."""
    buf.scatter_add_(-1, idx.unsqueeze(-1), torch.where(on_shard, g, 0.0).unsqueeze(-1))


def _out_buf(grad: torch.Tensor, sl: slice, stage: Optional[torch.Tensor]) -> torch.Tensor:
    """Where a chunk's fp32 gradient is built: the gradient rows themselves when fp32, else the staging buffer."""
    rows = grad[sl]
    return rows if stage is None else stage[: rows.shape[0]]


def _store(out: torch.Tensor, buf: torch.Tensor, temperature: float) -> None:
    """``out = buf / T`` (chain rule of the temperature), cast to the input dtype unless built in place."""
    if temperature != 1.0:
        buf.div_(temperature)
    if buf.data_ptr() != out.data_ptr():
        out.copy_(buf)


def _check(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor], temperature: float,
           chunk_size: Optional[int], world: int, ref_flags: bool) -> None:
    if not logits.is_floating_point():
        raise ValueError(f"token_stats: logits must be floating point, got {logits.dtype}")
    if logits.dim() < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"token_stats: labels shape {tuple(labels.shape)} must equal logits shape[:-1] "
                         f"{tuple(logits.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_stats: labels must be int64/int32 token ids, got {labels.dtype}")
    if ref_logits is not None and (ref_logits.shape != logits.shape or ref_logits.dtype != logits.dtype):
        raise ValueError(f"token_stats: ref_logits {tuple(ref_logits.shape)}/{ref_logits.dtype} must match logits "
                         f"{tuple(logits.shape)}/{logits.dtype}")
    if ref_logits is None and ref_flags:
        raise ValueError("token_stats: ref_entropy/kl/ref_requires_grad need ref_logits (the masked view)")
    if not temperature > 0:
        raise ValueError(f"token_stats: temperature must be > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"token_stats: chunk_size must be a positive int or None, got {chunk_size!r}")
    v_global = logits.shape[-1] * world
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= v_global))
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"token_stats: label {int(labels[bad][0])} outside [0, {v_global}) and not {IGNORE_INDEX}")


def token_stats(logits: torch.Tensor, labels: torch.Tensor, group: Optional[dist.ProcessGroup], *,
                ref_logits: Optional[torch.Tensor] = None, temperature: float = 1.0, entropy: bool = False,
                ref_entropy: bool = False, kl: bool = False, ref_requires_grad: bool = False,
                chunk_size: Optional[int] = None) -> TokenStats:
    """Log-probs (and optionally entropies and KL(p || q)) of vocab-parallel logits, differentiable.

    Args:
        logits: ``[..., V_local]`` this rank's vocab shard of the original view (any float dtype).
        labels: ``[...]`` global token ids; ``-100`` marks ignored tokens (all outputs 0, no gradient).
        group: the tensor-parallel group splitting the vocabulary; ``None`` or size 1 = whole vocab here.
        ref_logits: ``[..., V_local]`` the second (masked) view; ``ref_logprob`` is returned whenever it is given.
        temperature: logits of both views are divided by it first.
        entropy / ref_entropy / kl: also return H(p), H(q), KL(p || q) over the full vocabulary.
        ref_requires_grad: let gradients reach ``ref_logits`` (else the ref outputs are constants).
        chunk_size: process at most this many tokens at a time (bounds forward and backward memory); on CPU
            blocks are further capped at ~8 MiB of fp32 per work buffer.

    Returns:
        :class:`TokenStats`, float32 tensors of shape ``labels.shape``.
    """
    _, world = _world(group)
    _check(logits, labels, ref_logits, temperature, chunk_size, world,
           ref_flags=ref_entropy or kl or ref_requires_grad)
    lead = labels.shape
    x = logits.reshape(-1, logits.shape[-1])
    xr = None
    if ref_logits is not None:
        xr = ref_logits.reshape(-1, ref_logits.shape[-1])
        if not ref_requires_grad:
            xr = xr.detach()
    lp, ent, rlp, rent, kl_t = _TokenStatsFn.apply(
        x, xr, labels.reshape(-1).long(), group, float(temperature), entropy, ref_entropy, kl, ref_requires_grad,
        chunk_size)
    has_ref = ref_logits is not None
    return TokenStats(
        logprob=lp.view(lead),
        ref_logprob=rlp.view(lead) if has_ref else None,
        entropy=ent.view(lead) if entropy else None,
        ref_entropy=rent.view(lead) if ref_entropy else None,
        kl=kl_t.view(lead) if kl else None,
    )
