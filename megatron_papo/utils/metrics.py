"""Metric sinks (rank 0): ``metrics.jsonl``, tensorboard event files, and the wandb / mlflow trackers.

``logging.backends`` picks them (jsonl and tensorboard by default). Every sink gets the same
``{"step": s, ...}`` record per :meth:`MetricsWriter.write`. Resuming truncates ``metrics.jsonl`` to the
steps at or before the checkpoint (so a resumed run's file equals an uninterrupted run's), purges
later tensorboard events, and continues the same wandb / mlflow run (``utils/trackers.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence


class Sink(Protocol):
    """One metrics destination."""

    def write(self, step: int, rec: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """``<run_dir>/metrics.jsonl``: one JSON line per write (truncated to ``resume_step`` on resume)."""

    def __init__(self, run_dir: Path, resume_step: Optional[int]) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()

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

    def write(self, step: int, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        pass


class TensorboardSink:
    """``<run_dir>/tensorboard``: a scalar per finite number (events after ``resume_step`` purged on resume)."""

    def __init__(self, run_dir: Path, resume_step: Optional[int]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                 purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, rec: dict[str, Any]) -> None:
        for k, v in numeric(rec).items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class MetricsWriter:
    """Fan step metrics out to the configured sinks; a no-op off rank 0."""

    def __init__(self, run_dir: Path, *, enabled: bool, backends: Sequence[str] = ("jsonl", "tensorboard"),
                 resume_step: Optional[int] = None, config: Optional[dict[str, Any]] = None,
                 logging_cfg: Any = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.sinks: list[Sink] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in backends:
            if name == "jsonl":
                self.sinks.append(JsonlSink(self.run_dir, resume_step))
            elif name == "tensorboard":
                self.sinks.append(TensorboardSink(self.run_dir, resume_step))
            else:
                from megatron_papo.utils.trackers import open_tracker

                self.sinks.append(open_tracker(name, self.run_dir, resume_step=resume_step, config=config or {},
                                               logging_cfg=logging_cfg))

    @classmethod
    def from_config(cls, cfg: Any, *, enabled: bool, resume_step: Optional[int] = None) -> MetricsWriter:
        """The sinks of ``cfg.logging.backends`` for ``cfg.run_dir``; trackers get the resolved config."""
        from megatron_papo.config import to_dict

        return cls(Path(cfg.run_dir), enabled=enabled, backends=cfg.logging.backends, resume_step=resume_step,
                   config=to_dict(cfg), logging_cfg=cfg.logging)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """One record ``{"step": step, ...}`` to every sink (trackers and tensorboard take the finite numbers)."""
        if not self.enabled:
            return
        rec = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        for sink in self.sinks:
            sink.write(step, rec)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def numeric(rec: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record, without ``step``."""
    return {k: float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


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
