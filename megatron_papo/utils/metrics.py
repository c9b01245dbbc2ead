"""Metric sinks (rank 0): ``metrics.jsonl`` (one line per step) and tensorboard event files.

Resuming truncates ``metrics.jsonl`` to the steps at or before the checkpoint so a resumed run's
file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


class MetricsWriter:
    """Append step metrics to JSONL and tensorboard; a no-op off rank 0."""

    def __init__(self, run_dir: Path, *, enabled: bool, jsonl: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._jsonl = jsonl
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed run
            if rec.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """One JSON line ``{"step": step, ...}`` and a tensorboard scalar per finite number."""
        if not self.enabled:
            return
        rec = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        if self._jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return v.item() if v.numel() == 1 else v.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
