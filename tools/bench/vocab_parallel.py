"""Benchmark of ``token_stats`` against the naive all-gather way and mcore's vocab-parallel cross entropy.

Run under torchrun (gloo on CPU; TP = world size)::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/bench/vocab_parallel.py --tokens 4096 --vocab 32768

Methods (each: forward + backward of the sum of its outputs, upstream gradient 1):

* ``a`` / ``a_chunked``: ``token_stats`` on two views, all five outputs, gradients to both views
  (``a``: ``chunk_size=None``, which on CPU still works in cache-sized blocks; ``a_chunked``:
  ``--chunk-size``). ``a_unblocked``: ``a`` with the CPU block cap lifted, i.e. one block of all
  tokens, the memory behaviour of the unchunked GPU path.
* ``b``: all-gather both views' logits, ``log_softmax``/``softmax`` on the full vocabulary, the same
  five outputs, autograd; the local gradient is the vocab slice of the full gradient.
* ``c``: mcore ``vocab_parallel_cross_entropy`` (log-prob) plus a separate differentiable entropy pass,
  ONE view only (mcore's CE overwrites fp32 logits in place, so it gets a copy).

Memory is tensor accounting, like CUDA's ``memory_allocated``: a ``TorchDispatchMode`` records every
storage an op creates (views and in-place results of existing storages are not new) and drops it when
the storage is freed; allocations inside a kernel (workspaces) are not seen. Reported: the forward peak,
the backward peak minus the input gradients (which every method must return), and the larger of the two
divided by the bytes of one local logits shard per view. Times are the minimum (and the median) over
``--repeats`` runs after a warm-up, of the slowest rank, without the tracker; ratios use the minimum,
which is the least disturbed by other load on a shared machine. As a cross-check of the tracker, the
first method of a run also reports the growth of the process's RSS high-water mark during its memory
run (input gradients included; run with ``--methods X`` to check method X).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import megatron_papo.ops.vocab_parallel as vp
from megatron_papo.ops.vocab_parallel import token_stats


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of storages created by ops while the mode is active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.cur = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in seen or key in self.live:
                continue
            self.live[key] = st.nbytes()
            self._refs[key] = weakref.ref(st, partial(self._free, key))
            self.cur += st.nbytes()
            self.peak = max(self.peak, self.cur)
        return out

    def _free(self, key: int, _ref: Any) -> None:
        self.cur -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.cur


@contextlib.contextmanager
def _block_cap(lifted: bool):
    """Lift ``token_stats``' CPU block cap (forward and backward) for the ``a_unblocked`` method."""
    saved = vp._CPU_BLOCK_BYTES
    vp._CPU_BLOCK_BYTES = 1 << 62 if lifted else saved
    try:
        yield
    finally:
        vp._CPU_BLOCK_BYTES = saved


def _method_a(x, xr, labels, group, chunk_size=None):
    st = token_stats(x, labels, group, ref_logits=xr, entropy=True, ref_entropy=True, kl=True,
                     ref_requires_grad=xr.requires_grad, chunk_size=chunk_size)
    return st.logprob.sum() + st.ref_logprob.sum() + st.entropy.sum() + st.ref_entropy.sum() + st.kl.sum()


class _GatheredViews:
    """Method b: all-gather the views; returns the loss and a hook that slices local gradients out."""

    def __init__(self, x, xr, labels, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        v_local = x.shape[-1]
        self.sl = slice(rank * v_local, (rank + 1) * v_local)
        self.full = []
        for t in (x, xr):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.detach().contiguous(), group=group)
            self.full.append(torch.cat(parts, -1).requires_grad_(torch.is_grad_enabled() and t.requires_grad))
            del parts
        self.x, self.xr = x, xr
        z, zr = self.full
        logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
        p, q = logp.exp(), logq.exp()
        lab = labels.unsqueeze(-1)
        self.loss = (logp.gather(-1, lab).sum() + logq.gather(-1, lab).sum() - (p * logp).sum() - (q * logq).sum()
                     + (p * (logp - logq)).sum())

    def local_grads(self) -> None:
        for full, t in zip(self.full, (self.x, self.xr)):
            if full.grad is not None:
                t.grad = full.grad[..., self.sl].contiguous()
        self.full = []


def _entropy_pass(x, tp_group):
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as reduce_tp

    m = x.detach().amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    z = x - m.unsqueeze(-1)
    e = z.exp()
    s = reduce_tp(e.sum(-1), tp_group)
    ez = reduce_tp((e * z).sum(-1), tp_group)
    return torch.log(s) - ez / s


def _method_c(x, labels, tp_group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    nll = vocab_parallel_cross_entropy(x.clone(), labels)  # mcore overwrites fp32 logits in place
    return (-nll).sum() + _entropy_pass(x, tp_group).sum()


def _run_once(name: str, x, xr, labels, group, chunk: int, grad: bool) -> None:
    x.grad = None
    xr.grad = None
    with _block_cap(name == "a_unblocked"), torch.set_grad_enabled(grad):
        if name in ("a", "a_unblocked"):
            loss = _method_a(x, xr, labels, group)
        elif name == "a_chunked":
            loss = _method_a(x, xr, labels, group, chunk)
        elif name == "b":
            gv = _GatheredViews(x, xr, labels, group)
            loss = gv.loss
        else:
            loss = _method_c(x, labels, group)
        if grad:
            loss.backward()
            if name == "b":
                gv.local_grads()


def _timed(fn: Callable[[], None], repeats: int, group) -> tuple[float, float]:
    times = []
    for _ in range(repeats + 1):
        dist.barrier(group)
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
        times.append(float(dt))
    return statistics.median(times[1:]), min(times[1:])  # the first run is a warm-up


def _memory(name: str, x, xr, labels, group, chunk: int) -> dict[str, int]:
    x.grad = None
    xr.grad = None
    with _block_cap(name == "a_unblocked"), LiveTensorBytes() as mem:
        if name == "b":
            gv = _GatheredViews(x, xr, labels, group)
            loss = gv.loss
        elif name == "c":
            loss = _method_c(x, labels, group)
        else:
            loss = _method_a(x, xr, labels, group, chunk if name == "a_chunked" else None)
        fwd_peak, saved = mem.peak, mem.cur
        mem.reset_peak()
        loss.backward()
        if name == "b":
            gv.local_grads()
            del gv
        del loss
        grads = sum(t.grad.untyped_storage().nbytes() for t in (x, xr) if t.grad is not None)
        bwd_peak = mem.peak
    return {"fwd_peak": fwd_peak, "saved_for_bwd": saved, "bwd_peak_minus_grads": bwd_peak - grads, "grads": grads}


def main() -> None:
    """Parse args, build the shards, time and measure every method, print (and write) one JSON table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunk-size", type=int, default=0, help="for a_chunked; 0 = tokens // 8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="a,a_chunked,a_unblocked,b,c")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.parallel import init_distributed

    dist.init_process_group(backend="gloo")
    groups = init_distributed(ParallelConfig(tp=dist.get_world_size(), device="cpu"))
    group, tp, rank = groups.tp_group, groups.tp_size, groups.tp_rank
    if args.vocab % tp:
        raise SystemExit(f"--vocab {args.vocab} must be divisible by TP {tp}")
    v_local, chunk = args.vocab // tp, args.chunk_size or max(args.tokens // 8, 1)
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(args.tokens, v_local, generator=gen).mul_(2.0).requires_grad_(True)
    xr = torch.randn(args.tokens, v_local, generator=gen).mul_(0.5).add_(x.detach()).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(7))
    shard = x.numel() * x.element_size()

    rows = {}
    for i, name in enumerate(args.methods.split(",")):
        views = 1 if name == "c" else 2
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem = _memory(name, x, xr, labels, group, chunk)
        if i == 0:  # the RSS high-water mark cannot be reset: only the first method's delta means anything
            rss_delta = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
            mem["rss_high_water_delta_incl_grads"] = rss_delta
        extra = max(mem["fwd_peak"], mem["bwd_peak_minus_grads"])
        t_fb = _timed(partial(_run_once, name, x, xr, labels, group, chunk, True), args.repeats, group)
        t_f = _timed(partial(_run_once, name, x, xr, labels, group, chunk, False), args.repeats, group)
        rows[name] = {
            "time_fwd_bwd_s": round(t_fb[1], 4), "time_fwd_bwd_median_s": round(t_fb[0], 4),
            "time_fwd_s": round(t_f[1], 4), "time_fwd_median_s": round(t_f[0], 4),
            **{f"{k}_MiB": round(v / 2**20, 1) for k, v in mem.items()},
            "views": views,
            "peak_extra_per_view_in_shards": round(extra / (views * shard), 3),
        }
        x.grad = xr.grad = None
    table = {
        "setup": {"tp": tp, "tokens": args.tokens, "vocab": args.vocab, "v_local": v_local, "dtype": "float32",
                  "chunk_size": chunk, "shard_MiB": round(shard / 2**20, 1), "threads": torch.get_num_threads(),
                  "backend": dist.get_backend(group)},
        "methods": rows,
    }
    if "a" in rows and "b" in rows:
        table["ratios"] = {
            "time_fwd_bwd_a_over_b": round(rows["a"]["time_fwd_bwd_s"] / rows["b"]["time_fwd_bwd_s"], 3),
            "time_fwd_a_over_b": round(rows["a"]["time_fwd_s"] / rows["b"]["time_fwd_s"], 3),
        }
        for k in ("a_chunked", "a_unblocked", "c"):
            if k in rows:
                table["ratios"][f"time_fwd_bwd_{k}_over_b"] = round(
                    rows[k]["time_fwd_bwd_s"] / rows["b"]["time_fwd_bwd_s"], 3)
        table["goals"] = {
            "a_peak_extra_le_1.5_shards_per_view": rows["a"]["peak_extra_per_view_in_shards"] <= 1.5,
            "a_unblocked_peak_extra_le_1.5_shards_per_view": rows.get("a_unblocked", {}).get(
                "peak_extra_per_view_in_shards", 9) <= 1.5,
            "a_chunked_peak_extra_le_0.5_shards_per_view": rows.get("a_chunked", {}).get(
                "peak_extra_per_view_in_shards", 9) <= 0.5,
            "a_time_le_b": rows["a"]["time_fwd_bwd_s"] <= rows["b"]["time_fwd_bwd_s"],
        }
    if rank == 0:
        text = json.dumps(table, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
