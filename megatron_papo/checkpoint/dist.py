"""Atomic Megatron-Core dist-checkpoints: model (+ optimizer) shards, RNG states and trainer state.

Layout of ``<ckpt_root>``::

    step_000010/            one complete checkpoint (mcore torch_dist format + trainer_state.json + manifest.json)
    latest                  text file naming the newest COMPLETE checkpoint directory

A checkpoint is written to ``.tmp_step_000010`` by every rank; then rank 0 checks that the weights are finite
(a non-finite model is never written), writes ``manifest.json`` (every file's size, CRC32s: :func:`write_manifest`,
the one function that describes a checkpoint) and renames the directory; only then is ``latest`` replaced
atomically (write + os.replace). A crash at any point leaves ``latest`` pointing at the previous complete
checkpoint; stale ``.tmp_*`` directories of interrupted saves are removed by :func:`clean_stale`.

With ``async_saves`` (an :class:`AsyncSaves`, ``checkpoint.async_save``) the tensor files are written by
megatron-core's async save (``async_sharded_save=True``, scheduled on its ``AsyncCallsQueue``): the planning, the
non-finite check, ``common.pt``, the RNG states and the trainer state are written before :func:`save_checkpoint`
returns; the shards are written by a forked writer while training goes on. When every rank's writer is done
(:meth:`AsyncSaves.poll`, once per step, or :meth:`AsyncSaves.wait`), mcore's finalisation writes the metadata,
then the same :func:`_publish` as the synchronous path writes the manifest, renames the directory and moves
``latest``. At most one save is in flight; a process killed before that leaves the previous ``latest``.

On resume :func:`find_resumable` checks ``latest``'s checkpoint against its manifest and, when it fails (a
truncated or missing file, a changed CRC, an unreadable trainer state), warns with the path and the reason and
falls back to the newest checkpoint that passes. Pruning (``keep_last``) keeps the newest ``keep_last``
checkpoints and never removes the newest valid one. Checkpoints reshard on load (any TP/PP).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_papo.errors import CheckpointError
from megatron_papo.utils.logging import get_logger

log = get_logger("checkpoint")
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
SMALL_FILE = 64 << 20  # files up to this size always get a CRC32 in the manifest
# The distributed optimizer's state layout (Megatron-LM's default): each DP rank writes its own shard, no gather,
# reloadable at any DP size with the same TP/PP. mcore 0.16.1's own default (fully_sharded_model_space) needs
# ShardedTensor.flattened_range, which the same release rejects, so without this a distopt save fails.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``latest`` names under ``root`` (must be complete), or None when there is no marker."""
    root = Path(root)
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"checkpoint marker {marker} points at incomplete {path}; delete the marker to start fresh")
    return path


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(ckpt_dir: str | os.PathLike, step: int, *, verify: str = "size") -> dict[str, Any]:
    """Describe every file of a written checkpoint in ``manifest.json`` (size; CRC32 for files up to 64 MiB, or
    for all with ``verify="checksum"``). The one place that defines what a complete checkpoint is: an async
    writer calls it after its files are flushed, before ``latest`` moves."""
    ckpt_dir = Path(ckpt_dir)
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ckpt_dir.rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        entry: dict[str, Any] = {"size": p.stat().st_size}
        if verify == "checksum" or entry["size"] <= SMALL_FILE:
            entry["crc32"] = _crc32(p)
        files[p.relative_to(ckpt_dir).as_posix()] = entry
    manifest = {"format": 1, "step": step, "verify": verify, "files": files}
    tmp = ckpt_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, ckpt_dir / MANIFEST)
    return manifest


def validate_checkpoint(path: str | os.PathLike) -> Optional[str]:
    """None when ``path`` is a usable checkpoint, else the reason (one phrase naming the bad file).

    Checks the trainer state parses and every file in ``manifest.json`` exists with its size and CRC32.
    A checkpoint without a manifest (written before manifests existed) passes with its trainer state only."""
    path = Path(path)
    if not path.is_dir():
        return "directory missing"
    try:
        json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        return f"{path / TRAINER_STATE} unreadable ({type(e).__name__})"
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None
    try:
        files = json.loads(mpath.read_text())["files"]
        files = {str(k): {"size": int(v["size"]), **({"crc32": str(v["crc32"])} if "crc32" in v else {})}
                 for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{mpath} unreadable ({type(e).__name__})"
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != entry["size"]:
            return f"{f} has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if "crc32" in entry and _crc32(f) != entry["crc32"]:
            return f"{f} fails its CRC32 check (corrupt)"
    return None


def _step_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def find_resumable(root: str | os.PathLike, fix_marker: bool = True) -> Optional[Path]:
    """The newest usable checkpoint under ``root``: ``latest``'s if it validates, else the newest valid step dir
    (each failing one is warned about with its path and reason). None when there is none to resume from;
    CheckpointError when checkpoints exist but none is usable. With ``fix_marker`` (rank 0), ``latest`` is
    pointed at the one returned."""
    root = Path(root)
    marker = root / "latest"
    named = root / marker.read_text().strip() if marker.is_file() else None
    candidates = ([named] if named is not None else []) + [p for p in _step_dirs(root) if p != named]
    bad = []
    for path in candidates:
        reason = validate_checkpoint(path)
        if reason is None:
            if bad:
                log.warning("resuming from %s instead (the newest checkpoint that passes validation)", path)
                if fix_marker:
                    _write_marker(root, path)
            return path
        log.warning("checkpoint %s is unusable: %s; falling back to the previous one", path, reason)
        bad.append(f"{path.name}: {reason}")
    if bad:
        raise CheckpointError(f"no usable checkpoint in {root} ({'; '.join(bad)}); move the broken ones away, or set "
                              "checkpoint.resume=never (or a new run_dir) to start fresh")
    return None


def clean_stale(root: str | os.PathLike) -> list[Path]:
    """Remove ``.tmp_*`` directories that interrupted saves left behind (rank 0, at start); returns them."""
    root = Path(root)
    stale = sorted(p for p in root.glob(".tmp_*") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
        log.warning("removed %s, left by an interrupted save", p)
    return stale


def _write_marker(root: Path, path: Path) -> None:
    marker_tmp = root / ".latest.tmp"
    marker_tmp.write_text(path.name)
    os.replace(marker_tmp, root / "latest")


def weights_finite(model_chunks: list[torch.nn.Module]) -> bool:
    """True when every parameter of every chunk on every rank is finite (collective: MIN over the world)."""
    ok = all(bool(torch.isfinite(p).all()) for m in model_chunks for p in m.parameters())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = next((p.device for m in model_chunks for p in m.parameters()), torch.device("cpu"))
        flag = torch.tensor([1.0 if ok else 0.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() > 0)
    return ok


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside mcore's DDP wrapper (checkpoints use the model's own names, without ``module.``)."""
    return getattr(chunk, "module", chunk)


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(model_chunks)}


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str | os.PathLike, step: int, model_chunks: list[torch.nn.Module], optimizer: Any = None,
                    trainer_state: Optional[dict[str, Any]] = None, keep_last: int = 0, verify: str = "size",
                    async_saves: Optional[AsyncSaves] = None) -> Optional[Path]:
    """Collective: save model (+ optimizer) shards, per-rank RNG states and ``trainer_state`` atomically, with a
    manifest written before ``latest`` moves. Returns the checkpoint dir, or None (nothing written, error
    logged) when a weight is not finite.

    With ``async_saves`` the shards are written in the background (megatron-core async save) and the directory
    is published (manifest, rename, ``latest``, pruning) once every rank's writes are done: the returned path
    exists only after :meth:`AsyncSaves.poll` / :meth:`AsyncSaves.wait` reports it. A save still in flight is
    finished first (at most one at a time)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if async_saves is not None:
        async_saves.wait()
    if not weights_finite(model_chunks):
        log.error("NOT saving step %d: the model holds non-finite weights; 'latest' still names the last good "
                  "checkpoint", step)
        return None
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, metadata=OPTIM_METADATA)
    request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=async_saves is not None)
    with open(tmp / f"rng_rank{rank}.pkl", "wb") as f:
        pickle.dump(_rng_state(), f)
    _barrier()
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **(trainer_state or {})}, indent=1))

    def publish() -> None:
        if rank == 0:
            _publish(root, tmp, final, step, keep_last, verify)
        _barrier()

    if async_saves is None:
        publish()
    else:
        async_saves.schedule(request, step, final, publish)
    return final


def _publish(root: Path, tmp: Path, final: Path, step: int, keep_last: int, verify: str) -> None:
    """Rank 0, once every rank's files are written: manifest, rename, ``latest``, pruning."""
    write_manifest(tmp, step, verify=verify)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_marker(root, final)
    if keep_last > 0:
        _prune(root, keep_last)
    log.info("saved checkpoint %s", final)


class AsyncSaves:
    """megatron-core's ``AsyncCallsQueue`` for :func:`save_checkpoint` (``checkpoint.async_save``).

    Writers are forked per save (mcore's ``TemporalAsyncCaller``): a forked writer sees the host memory of the
    moment it was forked, so on CPU the parameters need no copy, and on GPU mcore copies them to the host first.
    :meth:`poll` (every rank, same point of the loop; one all-reduce) publishes a save whose writes are done on
    every rank; :meth:`wait` blocks until then. :meth:`abandon` (error paths, no collectives) only waits for the
    local writer: that save is never published, ``latest`` stays where it was."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self.pending: Optional[tuple[int, Path]] = None  # (step, final dir) of the save in flight
        self.scheduled_at = 0.0

    def schedule(self, request: Any, step: int, final: Path, publish: Any) -> None:
        """Collective: start the writers of ``request`` (from ``dist_checkpointing.save(async_sharded_save=True)``)
        and publish with ``publish()`` on every rank once all have finished."""
        if self.pending is not None:
            raise RuntimeError(f"async save of step {self.pending[0]} still in flight; wait() first")
        request.add_finalize_fn(publish)
        self.scheduled_at = time.perf_counter()
        self._queue.schedule_async_request(request)
        self.pending = (step, final)

    def _finalize(self, blocking: bool) -> Optional[Path]:
        if self.pending is None:
            return None
        step, final = self.pending
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # mcore raises CheckpointException (a BaseException) on every rank
            self.pending = None
            raise CheckpointError(f"async save of step {step} to {final} failed: {cause_line(e)}; 'latest' still "
                                  "names the previous checkpoint") from e
        if not done:
            return None
        self.pending = None
        log.info("async save of step %d published %.2f s after it was scheduled", step,
                 time.perf_counter() - self.scheduled_at)
        return final

    def poll(self) -> Optional[Path]:
        """Collective, non-blocking: publish the save in flight if every rank's writes are done; returns its dir."""
        return self._finalize(blocking=False)

    def wait(self) -> Optional[Path]:
        """Collective: wait for the save in flight (if any) and publish it; returns its dir."""
        return self._finalize(blocking=True)

    def abandon(self) -> None:
        """Local (no collectives): wait for this rank's writer and drop the save unpublished."""
        if self.pending is None:
            return
        for call in list(self._queue.async_calls):
            call.async_caller.close()
        self._queue.async_calls.clear()
        log.warning("async save of step %d was not published (the run stopped first); 'latest' still names the "
                    "previous checkpoint", self.pending[0])
        self.pending = None


def load_checkpoint(path: str | os.PathLike, model_chunks: list[torch.nn.Module], optimizer: Any = None,
                    load_rng: bool = True) -> dict[str, Any]:
    """Collective: load (and reshard) model (+ optimizer) from ``path``; returns the trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        torch_adam = _distopt_torch_adam(optimizer)
        _init_torch_adam_state(torch_adam)
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True, metadata=OPTIM_METADATA)
    try:
        loaded = dist_checkpointing.load(sd, str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException, mcore's errors are not
        raise CheckpointError(f"checkpoint {path} could not be loaded: {cause_line(e)}") from e
    if len(model_chunks) == 1:
        _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(model_chunks):
            _unwrap(m).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        with torch.no_grad():  # fp32 distopt: the main params are views of the model params (leaves needing grad)
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_torch_adam_step(torch_adam)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / f"rng_rank{rank}.pkl"
    if load_rng and rng_file.is_file():
        with open(rng_file, "rb") as f:
            _set_rng_state(pickle.load(f))
    return json.loads((path / TRAINER_STATE).read_text())


def _distopt_torch_adam(optimizer: Any) -> list[Any]:
    """The distributed optimizers in ``optimizer`` that step with torch's own Adam/AdamW (no TE/Apex: CPU runs)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in subs if isinstance(o, DistributedOptimizer)
            and type(getattr(o, "optimizer", None)) in (torch.optim.Adam, torch.optim.AdamW)]


def _init_torch_adam_state(optimizers: list[Any]) -> None:
    """Give a fresh torch Adam inside mcore's distributed optimizer the state tensors a step would create.

    megatron-core 0.16.1 builds the distopt load state dict from ``state_dict()``, which for torch Adam reads the
    per-parameter ``step`` and fails (``assert len(steps) == 1``) before the first step; the values are
    overwritten by the load."""
    for o in optimizers:
        inner = o.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p] = {"step": _adam_step(0.0, group, p), "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}


def _adam_step(value: float, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
    """torch Adam's per-parameter ``step`` where Adam keeps it: on the parameter's device when ``capturable`` or
    ``fused``, else a host scalar (as ``torch.optim.Adam`` creates it)."""
    on_device = bool(group.get("capturable") or group.get("fused"))
    return torch.tensor(value, device=p.device if on_device else "cpu")


def _restore_torch_adam_step(optimizers: list[Any]) -> None:
    """Set torch Adam's per-parameter ``step`` to the loaded one (kept in the param groups).

    megatron-core 0.16.1's dp_reshardable load copies the optimizer's pre-load ``step`` back over the loaded
    value (it is a ``LocalNonpersistentObject`` there), so without this a resumed run's bias correction would
    restart from the step the fresh optimizer had."""
    for o in optimizers:
        inner = o.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in inner.state[p]:
                    inner.state[p]["step"] = _adam_step(float(group["step"]), group, p)


def cause_line(e: BaseException) -> str:
    """The informative line of a (possibly multi-rank, multi-line) checkpointing error."""
    import re

    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.search(r"\w+(Error|Exception): ", ln)]
    return (named[-1] if named else lines[0] if lines else type(e).__name__)[:400]


def _prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` step dirs, never the one ``latest`` names nor the newest valid one."""
    steps = _step_dirs(root)
    keep = set(steps[:keep_last])
    marker = root / "latest"
    if marker.is_file():
        keep.add(root / marker.read_text().strip())
    newest_valid = next((p for p in steps if validate_checkpoint(p) is None), None)
    if newest_valid is not None:
        keep.add(newest_valid)
    for old in steps:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
