"""Moving full HF-named tensors into a running SGLang engine: bucketing and the three transports.

* ``tensor``: each bucket is flattened into one byte buffer and handed to the engine's
  ``update_weights_from_tensor(load_format="flattened_bucket")``. On CPU the buffer travels through
  the host pipe as shared memory. On GPU it is serialised as CUDA-IPC handles by SGLang's
  ``MultiprocessingSerializer`` in the caller (:func:`cuda_bucket_payloads`) — that branch is
  small, isolated and NOT run by CI (no GPU there). Either way the engine gets ONE serialisation PER TP
  RANK (:func:`per_rank_payloads`): each SGLang TP worker deserialises only ``payloads[tp_rank]``
  (SGLang 0.5.23 ``managers/tp_worker.py`` ``deserialize_own_rank``; ``entrypoints/engine.py``
  ``_serialize_tensors_per_rank``), and a serialisation may be consumed once: a CUDA-IPC handle carries
  one producer-side reference count, a CPU shared-memory fd (``DupFd``) is handed out once.
* ``distributed``: the caller is rank 0 of a process group with the engine's TP workers (gloo on
  CPU, NCCL on GPU) and broadcasts each flattened bucket; ``update_weights_from_distributed``.
* ``disk``: buckets are written as safetensors shards into a temporary directory that the engine
  loads with ``update_weights_from_disk`` (the fallback).

Memory: one bucket is materialised at a time (plus the one the engine is loading).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Union

import torch

from megatron_papo.rollout.base import EngineError

Pair = tuple[str, torch.Tensor]
BucketMeta = list[tuple[str, list[int], str, int, int]]  # name, shape, dtype name, start byte, end byte


def bucketize(items: Iterable[Union[Pair, list[Pair]]], bucket_bytes: int) -> Iterator[list[Pair]]:
    """Group ``(name, tensor)`` pairs into buckets of at most ``bucket_bytes`` per dtype (a tensor
    larger than a bucket gets its own). Lists in ``items`` are taken as ready-made buckets."""
    open_: dict[torch.dtype, list[Pair]] = {}
    sizes: dict[torch.dtype, int] = {}
    for item in items:
        if isinstance(item, list):
            yield item
            continue
        name, t = item
        nbytes = t.numel() * t.element_size()
        if open_.get(t.dtype) and sizes[t.dtype] + nbytes > bucket_bytes:
            yield open_.pop(t.dtype)
            sizes[t.dtype] = 0
        open_.setdefault(t.dtype, []).append((name, t))
        sizes[t.dtype] = sizes.get(t.dtype, 0) + nbytes
    for bucket in open_.values():
        if bucket:
            yield bucket


def flatten_bucket(bucket: list[Pair], device: Union[str, torch.device, None] = None,
                   shared: bool = False) -> tuple[torch.Tensor, BucketMeta]:
    """One contiguous uint8 buffer holding every tensor of the bucket back to back (one copy).

    ``shared`` (CPU): allocate the buffer in shared memory, so handing it to another process copies nothing.
    """
    meta: BucketMeta = []
    offset = 0
    for name, t in bucket:
        n = t.numel() * t.element_size()
        if offset % t.element_size():
            raise ValueError(f"unaligned tensor {name} at byte {offset}; bucket dtypes must be grouped")
        meta.append((name, list(t.shape), str(t.dtype).removeprefix("torch."), offset, offset + n))
        offset += n
    dev = torch.device(device) if device is not None else bucket[0][1].device
    if shared and dev.type == "cpu":
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(offset))
    else:
        flat = torch.empty(offset, dtype=torch.uint8, device=dev)
    for (_, t), (_, _, _, s, e) in zip(bucket, meta):
        flat[s:e].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, meta


def unflatten_bucket(flat: torch.Tensor, meta: BucketMeta) -> list[Pair]:
    """Inverse of :func:`flatten_bucket` (views into ``flat``)."""
    return [(name, flat[s:e].view(getattr(torch, dt)).view(shape)) for name, shape, dt, s, e in meta]


def push_buckets(engine: Any, items: Iterable[Union[Pair, list[Pair]]], transport: str, bucket_bytes: int) -> dict[str, float]:
    """Push all tensors through ``transport`` inside the engine's weight-update bracket, then flush caches."""
    t0 = time.perf_counter()
    n_tensors = n_bytes = 0
    if transport == "disk":
        tmp = tempfile.mkdtemp(prefix="sglang_weights_")
        try:
            from safetensors.torch import save_file

            for i, bucket in enumerate(bucketize(items, bucket_bytes)):
                save_file({k: v.detach().contiguous().cpu() for k, v in bucket}, os.path.join(tmp, f"model-{i:05d}.safetensors"))
                n_tensors += len(bucket)
                n_bytes += sum(v.numel() * v.element_size() for _, v in bucket)
            engine.update_weights_from_disk(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"tensors": n_tensors, "bytes": n_bytes, "seconds": time.perf_counter() - t0}
    if transport not in ("tensor", "distributed"):
        raise ValueError(f"rollout.transport={transport!r}; expected one of tensor, distributed, disk")
    buckets = bucketize(items, bucket_bytes)
    opened = False
    engine._send("begin_update")
    try:
        try:  # the engine opens its bracket while this rank builds the first bucket (the actor's HF conversion)
            first = next(buckets, None)
        finally:
            engine._check(engine._recv("begin_update"), "begin_weight_update", allow_none=True)
            opened = True
        for bucket in itertools.chain([] if first is None else [first], buckets):
            if transport == "tensor":
                _push_tensor(engine, bucket)
            else:
                _push_distributed(engine, bucket)
            n_tensors += len(bucket)
            n_bytes += sum(v.numel() * v.element_size() for _, v in bucket)
    finally:
        if opened and engine._running():
            engine._check(engine._call("end_update"), "end_weight_update", allow_none=True)
    engine._check(engine._call("flush_cache"), "flush_cache", allow_none=True)
    return {"tensors": n_tensors, "bytes": n_bytes, "seconds": time.perf_counter() - t0}


def per_rank_payloads(obj: Any, tp: int, serialize: Callable[[Any], Any]) -> list[Any]:
    """``tp`` independent serialisations of ``obj``, one per engine TP rank (never one repeated ``tp`` times:
    each serialisation carries handles that exactly one receiver may consume)."""
    return [serialize(obj) for _ in range(int(tp))]


@contextlib.contextmanager
def cuda_ipc_reductions() -> Iterator[None]:
    """SGLang's ``monkey_patch_torch_reductions`` while CUDA tensors are pickled in this (the trainer's) process.

    The patch writes the GPU's UUID instead of its index into each CUDA-IPC handle, so a receiver whose
    ``CUDA_VISIBLE_DEVICES`` numbers the GPUs differently opens the right one (the SGLang workers apply the
    same patch before deserialising). Undone afterwards unless it was on before: under it ForkingPickler
    cannot pickle CPU tensors (``_modify_tuple`` indexes a CUDA-only argument), which other pipes need.
    """
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from torch.multiprocessing import reductions

    was_on = hasattr(reductions, "_reduce_tensor_original")
    monkey_patch_torch_reductions()
    try:
        yield
    finally:
        if not was_on and hasattr(reductions, "_reduce_tensor_original"):
            reductions.reduce_tensor = reductions._reduce_tensor_original
            reductions.rebuild_cuda_tensor = reductions._rebuild_cuda_tensor_original
            del reductions._reduce_tensor_original, reductions._rebuild_cuda_tensor_original
            reductions.init_reductions()


def _push_tensor(engine: Any, bucket: list[Pair]) -> None:
    if bucket[0][1].is_cuda:  # GPU only, not run by CI
        payloads, flat = cuda_bucket_payloads(bucket, int(engine.engine_kwargs.get("tp_size", 1)))
        res = engine._call("update_serialized", payloads=payloads, load_format="flattened_bucket", flush_cache=False)
        del flat  # the producer's buffer lives until every rank has loaded it (the call returns after that)
    else:
        flat, meta = flatten_bucket(bucket, "cpu", shared=getattr(engine, "shared_flat", True))
        res = engine._call("update_flat", flat=flat, meta=meta, flush_cache=False)
    engine._check(res, "update_weights_from_tensor")


def cuda_bucket_payloads(bucket: list[Pair], tp: int) -> tuple[list[str], torch.Tensor]:
    """GPU-only (NOT exercised by CI with CUDA tensors): a bucket flattened on its device and serialised as
    CUDA-IPC handles in SGLang's flattened_bucket format, once per TP rank, under :func:`cuda_ipc_reductions`.

    Returns the payloads and the flattened buffer, which the caller keeps alive until the engine has loaded it.
    """
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    b = FlattenedTensorBucket(named_tensors=[(n, t.detach().contiguous()) for n, t in bucket])
    obj = {"flattened_tensor": b.get_flattened_tensor(), "metadata": b.get_metadata()}
    with cuda_ipc_reductions():
        payloads = per_rank_payloads(obj, tp, lambda o: MultiprocessingSerializer.serialize(o, output_str=True))
    return payloads, obj["flattened_tensor"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_custom_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                      timeout: timedelta = timedelta(minutes=10)) -> Any:
    """A process group outside the default one (the trainer's), as SGLang's scheduler builds its side."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                      group_name=group_name, backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _ensure_group(engine: Any) -> tuple[Any, str]:
    if engine._update_group is not None:
        return engine._update_group
    engine._group_seq += 1
    name = f"megatron_papo_weights_{os.getpid()}_{engine._group_seq}"
    port = _free_port()
    tp = int(engine.engine_kwargs.get("tp_size", 1))
    backend = "gloo" if engine.device == "cpu" else "nccl"
    engine._send("init_group", master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=tp + 1,
                 group_name=name, backend=backend)
    pg = init_custom_group(backend, f"tcp://127.0.0.1:{port}", tp + 1, 0, name,
                           timeout=timedelta(seconds=engine.timeout_s))
    engine._check(engine._recv("init_weights_update_group"), "init_weights_update_group")
    engine._update_group = (pg, name)
    return engine._update_group


def _push_distributed(engine: Any, bucket: list[Pair]) -> None:
    pg, name = _ensure_group(engine)
    device = "cpu" if engine.device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    flat, meta = flatten_bucket(bucket, device)
    engine._send("update_distributed", names=[m[0] for m in meta], dtypes=[m[2] for m in meta],
                 shapes=[m[1] for m in meta], group_name=name, flush_cache=False, load_format="flattened_bucket")
    try:
        pg.broadcast([flat], torch.distributed.BroadcastOptions()).wait()
    except BaseException:
        with contextlib.suppress(Exception):  # its answer must not be read by the next call (end_update)
            engine._recv("update_weights_from_distributed")
        raise
    res = engine._recv("update_weights_from_distributed")
    engine._check(res, "update_weights_from_distributed")
    if res is None:
        raise EngineError("update_weights_from_distributed returned nothing")
