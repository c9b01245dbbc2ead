"""Megatron-Core actor → rollout engine weight sync: plan → gather → map → push.

* **plan** (:func:`plan_buckets`): the adapter's export plan (``hf_adapter.export_plan``: one
  ``ParamSpec`` per mcore parameter with its HF names, layout kind, owning PP stage and HF shapes)
  cut into buckets of at most ``bucket_bytes`` of HF tensors, one owner stage and one dtype per
  bucket, in plan order — identical on every rank.
* **gather** (owner stage): the bucket's TP shards are packed into one buffer and all-gathered with
  ONE ``all_gather_into_tensor`` over the TP group (replicated params are not gathered).
* **map**: ``hf_adapter.shards_to_hf`` turns each parameter's shards into full HF checkpoint-named
  tensors (QKV de-interleave, GLU split, row/column concat). No mapping lives here.
* **pp**: a bucket owned by a later stage is packed and broadcast over the PP group, so the pushing
  ranks on stage 0 receive it; with ``all_stages`` (colocated engine owners on every stage) every bucket is
  broadcast, so every rank holds every bucket.
* **push**: rank 0 hands each bucket to ``engine.update_weights`` while the next one is produced on
  demand; memory is one gathered bucket plus the one the engine is loading.

With a ``SyncState`` passed from sync to sync, frozen parameters (``requires_grad=False``, e.g. a
frozen vision tower) are pushed once and skipped afterwards (one MAX all-reduce of a flag vector
per sync keeps the ranks in agreement).

Every rank must call :func:`sync_weights` (the gathers are collective); only the rank that holds
the engine passes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_papo.models.qwen2_5_vl.hf_adapter import (
    Kind,
    ParamSpec,
    _groups,
    _size_rank,
    _unwrap,
    export_plan,
    global_param_names,
    shards_to_hf,
)

Pair = tuple[str, torch.Tensor]


@dataclass
class SyncBucket:
    """A set of mcore parameters gathered, mapped and pushed together."""

    index: int
    stage: int
    dtype: torch.dtype
    specs: list[ParamSpec]
    nbytes: int  # bytes of the full HF tensors


@dataclass
class SyncState:
    """What was pushed before (for skipping frozen parameters): mcore name → storage pointer."""

    seen: dict[str, int] = field(default_factory=dict)


def _hf_numel(spec: ParamSpec) -> int:
    n = 0
    for shape in spec.hf_shapes:
        k = 1
        for s in shape:
            k *= s
        n += k
    return n


def plan_buckets(specs: list[ParamSpec], dtype: torch.dtype, bucket_bytes: int) -> list[SyncBucket]:
    """Deterministic buckets in plan order: a bucket holds one stage's parameters of one dtype, at most
    ``bucket_bytes`` of HF tensors (a larger parameter gets a bucket of its own)."""
    buckets: list[SyncBucket] = []
    open_: dict[int, SyncBucket] = {}
    esize = torch.empty((), dtype=dtype).element_size()
    for spec in specs:
        nbytes = _hf_numel(spec) * esize
        b = open_.get(spec.stage)
        if b is not None and b.nbytes + nbytes > bucket_bytes:
            open_.pop(spec.stage)
            b = None
        if b is None:
            b = SyncBucket(index=len(buckets), stage=spec.stage, dtype=dtype, specs=[], nbytes=0)
            buckets.append(b)
            open_[spec.stage] = b
        b.specs.append(spec)
        b.nbytes += nbytes
    return buckets


def _local_params(model_chunks: Any) -> dict[str, torch.nn.Parameter]:
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    out: dict[str, torch.nn.Parameter] = {}
    for c in chunks:
        out.update(global_param_names(c))
    return out


def changed_specs(specs: list[ParamSpec], local: dict[str, torch.nn.Parameter], state: SyncState) -> list[ParamSpec]:
    """The specs that may have changed since the last sync recorded in ``state`` (collective).

    A parameter is skipped only when it is frozen (``requires_grad=False``) on every rank holding it and
    was pushed before from the same storage. Version counters are not used: Megatron's optimizers
    write parameters through ``.data``/buffer views, which do not bump them.
    """
    device = next(iter(local.values())).device
    flags = torch.zeros(len(specs), dtype=torch.int32, device=device)
    for i, s in enumerate(specs):
        p = local.get(s.mcore)
        if p is not None and (p.requires_grad or state.seen.get(s.mcore) != p.data_ptr()):
            flags[i] = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [s for s, f in zip(specs, flags.tolist()) if f]


def _gather_bucket(bucket: SyncBucket, local: dict[str, torch.nn.Parameter], tp_group: Any, tp: int) -> list[Pair]:
    """Owner stage: full HF tensors of the bucket (one TP all-gather for all its sharded params)."""
    sharded = [s for s in bucket.specs if s.kind != Kind.REPLICATED and tp > 1]
    gathered: dict[str, list[torch.Tensor]] = {}
    if sharded:
        parts = [local[s.mcore].detach() for s in sharded]
        send = torch.cat([p.reshape(-1) for p in parts])
        recv = torch.empty(tp * send.numel(), dtype=send.dtype, device=send.device)
        dist.all_gather_into_tensor(recv, send, group=tp_group)
        per_rank = recv.view(tp, send.numel())
        off = 0
        for s, p in zip(sharded, parts):
            n = p.numel()
            gathered[s.mcore] = [per_rank[r, off:off + n].view(p.shape) for r in range(tp)]
            off += n
    out: list[Pair] = []
    for s in bucket.specs:
        shards = gathered.get(s.mcore) or [local[s.mcore].detach()]
        full = shards_to_hf(s, shards)
        out.extend((n, full[n].contiguous()) for n in s.hf)
    return out


def _broadcast_bucket(bucket: SyncBucket, pairs: Optional[list[Pair]], pp_group: Any, device: torch.device) -> list[Pair]:
    """Send a later stage's bucket over the PP group, packed into one buffer."""
    names = [n for s in bucket.specs for n in s.hf]
    shapes = [sh for s in bucket.specs for sh in s.hf_shapes]
    numels = [int(torch.Size(sh).numel()) for sh in shapes]
    if pairs is not None:
        flat = torch.cat([t.reshape(-1) for _, t in pairs])
    else:
        flat = torch.empty(sum(numels), dtype=bucket.dtype, device=device)
    dist.broadcast(flat, src=dist.get_global_rank(pp_group, bucket.stage), group=pp_group)
    out, off = [], 0
    for n, sh, k in zip(names, shapes, numels):
        out.append((n, flat[off:off + k].view(sh)))
        off += k
    return out


def iter_hf_buckets(model_chunks: Any, bucket_bytes: int = 512 << 20, *, state: Optional[SyncState] = None,
                    stats: Optional[dict[str, float]] = None, all_stages: bool = False) -> Iterator[list[Pair]]:
    """Yield, bucket by bucket, the full HF checkpoint-named tensors of the whole model on the ranks of
    PP stage 0 (later stages yield nothing). Collective: every rank must exhaust the iterator.

    ``all_stages``: every rank of every stage yields every bucket (a stage's own buckets are broadcast over the
    PP group too) -- for colocated engine owners on later pipeline stages (``rollout.fleet``)."""
    chunk = _unwrap(model_chunks[0] if isinstance(model_chunks, (list, tuple)) else model_chunks)
    tp_group, pp_group = _groups(chunk)
    tp, _ = _size_rank(tp_group)
    pp, pp_rank = _size_rank(pp_group)
    local = _local_params(model_chunks)
    first = next(iter(local.values()))
    specs = export_plan(model_chunks)
    total = len(specs)
    if state is not None:
        specs = changed_specs(specs, local, state)
    if stats is not None:
        stats["skipped_params"] = total - len(specs)
    for bucket in plan_buckets(specs, first.dtype, bucket_bytes):
        pairs = _gather_bucket(bucket, local, tp_group, tp) if bucket.stage == pp_rank else None
        if pp > 1 and (bucket.stage != 0 or all_stages):  # every PP rank takes part in the broadcast
            pairs = _broadcast_bucket(bucket, pairs, pp_group, first.device)
        if pp_rank == 0 or all_stages:
            if stats is not None:
                stats["bytes"] = stats.get("bytes", 0) + bucket.nbytes
                stats["buckets"] = stats.get("buckets", 0) + 1
            yield pairs
    if state is not None:
        for name, p in local.items():
            state.seen[name] = p.data_ptr()


def sync_weights(model_chunks: Any, engine: Any = None, *, bucket_mb: int = 512, state: Optional[SyncState] = None,
                 transport: Optional[str] = None) -> dict[str, float]:
    """Push the actor's weights into ``engine`` (given on the rank that owns it; None elsewhere).

    Collective over the model's TP/PP groups (and over the world when ``state`` is given, to agree on
    unchanged parameters). Returns ``{"seconds", "bytes", "buckets", "skipped_params"}`` (bytes and
    buckets as seen by this rank).
    """
    t0 = time.perf_counter()
    stats: dict[str, float] = {"bytes": 0, "buckets": 0, "skipped_params": 0}
    buckets = iter_hf_buckets(model_chunks, int(bucket_mb) << 20, state=state, stats=stats)
    if engine is not None:
        kw = {"transport": transport} if transport is not None else {}
        engine.update_weights(buckets, **kw)
    else:
        for _ in buckets:
            pass
    stats["seconds"] = time.perf_counter() - t0
    return stats
