"""Weight sync fanned out to every engine of a :class:`~megatron_papo.rollout.fleet.RolloutFleet`.

* **one engine on this rank** (colocated owners; a single separate engine): the engine's own transport
  (``engine.update_weights``: shared memory / CUDA IPC / its own weight group / disk). Owners push in parallel;
  owners on later pipeline stages get the buckets from ``iter_hf_buckets(all_stages=True)``.
* **several engines on this rank** (``placement=separate``, ``num_engines > 1`` or external servers):
  ``transport=distributed`` builds ONE weight-update group of this rank (rank 0) and every engine's TP workers
  (engine k joins at ``rank_offset = 1 + tp_0 + ... + tp_{k-1}``), so each bucket is broadcast once for the whole
  fleet; ``transport=disk`` writes each bucket once and every engine loads the directory; ``tensor`` (same
  machine only) hands the same shared-memory buffer to every engine.

A failing engine never leaves a rank inside a collective: the owner stops pushing, still walks the remaining
buckets (the TP/PP gathers are collective), and the ranks agree on the error after the last bucket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from datetime import timedelta
from typing import Any, Iterable

import torch

from megatron_papo.rollout.weight_sync import iter_hf_buckets
from megatron_papo.rollout.weight_transport import _free_port, flatten_bucket, init_custom_group

Pair = tuple[str, torch.Tensor]


def sync_fleet(fleet: Any, model_chunks: Any, state: Any = None) -> dict[str, float]:
    """Push the actor's weights into every engine of ``fleet``; returns ``{"seconds", "bytes", "buckets",
    "skipped_params"}`` (bytes/buckets as seen by this rank). Collective."""
    t0 = time.perf_counter()
    stats: dict[str, float] = {"bytes": 0, "buckets": 0, "skipped_params": 0}
    buckets = iter_hf_buckets(model_chunks, int(fleet.bucket_mb) << 20, state=state, stats=stats,
                              all_stages=fleet.all_stages)
    errors: list[str] = []
    mine = sorted(fleet.engines)
    if len(mine) == 1:
        ok, err = fleet._guarded(mine[0], lambda eng: eng.update_weights(buckets))
        if not ok:
            errors.append(err)
    elif mine:
        push = {"distributed": _push_group, "disk": _push_disk}.get(fleet.transport, _push_shared)
        try:
            push(fleet, buckets)
        except Exception as e:
            errors.append(_blame(fleet, e))
    for _ in buckets:  # nothing left on success; after a failure: take part in the remaining collectives
        pass
    fleet._agree(errors, "weight sync")
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _blame(fleet: Any, err: BaseException) -> str:
    """Name the dead engines of this rank (or all of them when none is visibly dead)."""
    from megatron_papo.rollout.fleet import _describe

    alive = fleet.alive()
    dead = [k for k, ok in alive.items() if not ok] or sorted(alive)
    return "; ".join(_describe(fleet.slots[k], fleet.engines[k], getattr(fleet.engines[k], "host_pid", None), err)
                     for k in dead)


def _engines(fleet: Any) -> list[Any]:
    return [fleet.engines[k] for k in sorted(fleet.engines)]


def _all(engines: list[Any], method: str, what: str, *, done: list[Any] | None = None, **kwargs: Any) -> list[Any]:
    """Send one call to every engine, then collect every answer (the engines work side by side)."""
    for e in engines:
        e._send(method, **kwargs)
    return _collect(engines, what, done)


def _collect(engines: list[Any], what: str, done: list[Any] | None = None) -> list[Any]:
    """Every engine's answer to the call in flight, read even when one fails (none is left for the next call);
    then the first failure is raised. ``done`` collects the engines that answered with success."""
    answers, first = [], None
    for e in engines:
        try:
            answers.append(e._check(e._recv(what), what, allow_none=True))
            if done is not None:
                done.append(e)
        except Exception as err:
            first = first or err
    if first is not None:
        raise first
    return answers


def _group_address(engines: list[Any]) -> str:
    """Where the engines reach this rank: loopback for local engines, ``MASTER_ADDR`` when some are external."""
    if any(getattr(e, "external", False) for e in engines):
        return os.environ.get("MASTER_ADDR", "127.0.0.1")
    return "127.0.0.1"


def _ensure_group(fleet: Any) -> tuple[Any, str]:
    """ONE process group: this rank (0) and the TP workers of every engine, each engine at its rank offset."""
    if fleet._weight_group is not None:
        return fleet._weight_group
    engines = _engines(fleet)
    tps = [int(e.engine_kwargs.get("tp_size", 1)) for e in engines]
    world = 1 + sum(tps)
    name = f"megatron_papo_fleet_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    addr, port = _group_address(engines), _free_port()
    backend = "gloo" if fleet.device_type == "cpu" else "nccl"
    offset = 1
    for e, tp in zip(engines, tps):
        e._send("init_group", master_address=addr, master_port=port, rank_offset=offset, world_size=world,
                group_name=name, backend=backend)
        offset += tp
    timeout = timedelta(seconds=max(e.timeout_s for e in engines))
    pg = init_custom_group(backend, f"tcp://{addr}:{port}", world, 0, name, timeout=timeout)
    for e in engines:
        e._check(e._recv("init_weights_update_group"), "init_weights_update_group")
    fleet._weight_group = (pg, name)
    return fleet._weight_group


def _bracket(engines: list[Any], push: Any) -> None:
    """SGLang's weight-update bracket around ``push()`` on every engine, then a cache flush."""
    opened: list[Any] = []
    try:
        _all(engines, "begin_update", "begin_weight_update", done=opened)
        push()
    finally:  # close every bracket that opened, even when another engine's begin failed
        live = [e for e in opened if e._running()]
        if live:
            _all(live, "end_update", "end_weight_update")
    _all(engines, "flush_cache", "flush_cache")


def _push_group(fleet: Any, buckets: Iterable[list[Pair]]) -> None:
    engines = _engines(fleet)
    pg, name = _ensure_group(fleet)
    device = "cpu" if fleet.device_type == "cpu" else torch.device("cuda", torch.cuda.current_device())

    def push() -> None:
        for bucket in buckets:
            flat, meta = flatten_bucket(bucket, device)
            for e in engines:
                e._send("update_distributed", names=[m[0] for m in meta], dtypes=[m[2] for m in meta],
                        shapes=[m[1] for m in meta], group_name=name, flush_cache=False, load_format="flattened_bucket")
            try:
                pg.broadcast([flat], torch.distributed.BroadcastOptions()).wait()  # once for the whole fleet
            except BaseException:
                with contextlib.suppress(Exception):  # their answers must not be read by the next call
                    _collect(engines, "update_weights_from_distributed")
                raise
            if any(res is None for res in _collect(engines, "update_weights_from_distributed")):
                raise RuntimeError("update_weights_from_distributed returned nothing")

    _bracket(engines, push)


def _push_shared(fleet: Any, buckets: Iterable[list[Pair]]) -> None:
    """Same machine only: one shared-memory buffer per bucket, loaded by every engine."""
    engines = _engines(fleet)

    def push() -> None:
        for bucket in buckets:
            flat, meta = flatten_bucket(bucket, "cpu", shared=True)
            _all(engines, "update_flat", "update_weights_from_tensor", flat=flat, meta=meta, flush_cache=False)

    _bracket(engines, push)


def _push_disk(fleet: Any, buckets: Iterable[list[Pair]]) -> None:
    """Each bucket written once as a safetensors shard; every engine loads the directory."""
    from safetensors.torch import save_file

    engines = _engines(fleet)
    tmp = tempfile.mkdtemp(prefix="sglang_fleet_weights_")
    try:
        for i, bucket in enumerate(buckets):
            save_file({k: v.detach().contiguous().cpu() for k, v in bucket}, os.path.join(tmp, f"model-{i:05d}.safetensors"))
        _all(engines, "update_disk", "update_weights_from_disk", model_path=tmp)
        _all(engines, "flush_cache", "flush_cache")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
