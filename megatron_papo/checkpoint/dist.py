"""Atomic Megatron-Core dist-checkpoints: model (+ optimizer) shards, RNG states and trainer state.

Layout of ``<ckpt_root>``::

    step_000010/            one complete checkpoint (mcore torch_dist format + trainer_state.json)
    latest                  text file naming the newest COMPLETE checkpoint directory

A checkpoint is written to ``.tmp_step_000010`` and renamed only after every rank has finished, then
``latest`` is replaced atomically (write + os.replace). A crash at any point leaves ``latest``
pointing at the previous complete checkpoint. Checkpoints reshard on load (any TP/PP).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_papo.utils.logging import get_logger

log = get_logger("checkpoint")
TRAINER_STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (via ``latest``), or None."""
    root = Path(root)
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise RuntimeError(f"checkpoint marker {marker} points at incomplete {path}; delete the marker to start fresh")
    return path


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
                    trainer_state: Optional[dict[str, Any]] = None, keep_last: int = 0) -> Path:
    """Collective: save model (+ optimizer) shards, per-rank RNG states and ``trainer_state`` atomically."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
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
        sd["optimizer"] = optimizer.sharded_state_dict(sd)
    dist_checkpointing.save(sd, str(tmp))
    with open(tmp / f"rng_rank{rank}.pkl", "wb") as f:
        pickle.dump(_rng_state(), f)
    _barrier()
    if rank == 0:
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **(trainer_state or {})}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker_tmp = root / ".latest.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / "latest")
        if keep_last > 0:
            _prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model_chunks: list[torch.nn.Module], optimizer: Any = None,
                    load_rng: bool = True) -> dict[str, Any]:
    """Collective: load (and reshard) model (+ optimizer) from ``path``; returns the trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True)
    loaded = dist_checkpointing.load(sd, str(path))
    if len(model_chunks) == 1:
        _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, m in enumerate(model_chunks):
            _unwrap(m).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / f"rng_rank{rank}.pkl"
    if load_rng and rng_file.is_file():
        with open(rng_file, "rb") as f:
            _set_rng_state(pickle.load(f))
    return json.loads((path / TRAINER_STATE).read_text())


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
