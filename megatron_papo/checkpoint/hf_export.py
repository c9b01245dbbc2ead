"""HF exports during training (``checkpoint.hf_every``): ``<run_dir>/hf/step_XXXXXX``, loadable by transformers/SGLang.

The export goes through the converter's path (``checkpoint/convert.py``): ``export_to_hf`` (the one HF mapping,
collective over TP and PP) yields every tensor under its checkpoint name; rank 0 keeps a host copy of each, and
training goes on as soon as the gather is done. A background thread on rank 0 then streams the copies into
safetensors shards with the converter's :class:`~megatron_papo.checkpoint.convert.HFShardWriter`, copies the base
model's config/tokenizer/processor files (:func:`~megatron_papo.checkpoint.convert.copy_hf_assets`) into
``hf/.tmp_step_XXXXXX`` and renames that directory to ``hf/step_XXXXXX`` (a reader never sees a partial export; a
killed writer leaves a ``.tmp_*`` directory, removed at the next start). ``keep_last`` keeps the newest exports.
At most one export is written at a time; :meth:`HFExports.wait` joins the writer (local, no collectives).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_papo.checkpoint.convert import HFShardWriter, copy_hf_assets, export_sizes
from megatron_papo.checkpoint.dist import step_dir_name
from megatron_papo.utils.logging import get_logger

log = get_logger("hf_export")


class HFExports:
    """Writes HF exports of the actor under ``root`` (``<run_dir>/hf``); see the module docstring."""

    def __init__(self, root: str | Path, hf_base: str | Path, dtype: torch.dtype, keep_last: int = 0,
                 max_shard_bytes: int = 5 << 30) -> None:
        self.root, self.hf_base = Path(root), Path(hf_base)
        self.dtype, self.keep_last, self.max_shard_bytes = dtype, keep_last, max_shard_bytes
        self.writes = (dist.get_rank() if dist.is_initialized() else 0) == 0
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        if self.writes and self.root.is_dir():
            for stale in self.root.glob(".tmp_step_*"):
                log.warning("removing %s (an HF export that was interrupted)", stale)
                shutil.rmtree(stale, ignore_errors=True)

    def export(self, step: int, model_chunks: list[torch.nn.Module], pg: Any) -> float:
        """Collective over TP/PP: gather the actor's HF tensors (rank 0 keeps host copies) and start writing
        ``step_XXXXXX`` in the background. Returns the seconds training was paused (the gather)."""
        from megatron_papo.models.qwen2_5_vl import export_plan, export_to_hf

        self.wait()
        t0 = time.perf_counter()
        plan = export_plan(model_chunks)
        tensors: list[tuple[str, torch.Tensor]] = []
        for name, tensor in export_to_hf(model_chunks, pg, plan=plan):
            if self.writes:  # a copy: training changes the parameters while the writer runs
                tensors.append((name, tensor.detach().to("cpu", copy=True)))
        paused = time.perf_counter() - t0
        if self.writes:
            sizes = export_sizes(plan, self.dtype)
            self._thread = threading.Thread(target=self._write, args=(step, tensors, sizes), daemon=True,
                                            name=f"hf-export-{step}")
            self._thread.start()
        return paused

    def _write(self, step: int, tensors: list[tuple[str, torch.Tensor]], sizes: list[tuple[str, int]]) -> None:
        try:
            t0 = time.perf_counter()
            final = self.root / step_dir_name(step)
            tmp = self.root / f".tmp_{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            writer = HFShardWriter(tmp, sizes, self.max_shard_bytes)
            for name, tensor in tensors:
                writer.add(name, tensor)
            writer.close()
            copy_hf_assets(self.hf_base, tmp, self.dtype)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if self.keep_last > 0:
                for old in sorted(self.root.glob("step_*"))[:-self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            log.info("HF export %s written in %.2f s (background)", final, time.perf_counter() - t0)
        except BaseException as e:  # re-raised by wait() on the training thread
            self._error = e

    def wait(self) -> None:
        """Local: wait for the export being written (if any); raises what the writer raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"HF export under {self.root} failed: {err}") from err

    def close(self) -> None:
        """Local, for shutdown paths: like :meth:`wait`, but a failed export is logged instead of raised."""
        try:
            self.wait()
        except RuntimeError as e:
            log.error("%s", e)
