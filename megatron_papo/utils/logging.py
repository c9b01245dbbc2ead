"""Rank-aware logging: rank-0 console, one log file per rank, warn-once, progress bars with ETA."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_LOGGER_NAME = "megatron_papo"
_warned: set[str] = set()


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - torch always importable here
        pass
    return int(os.environ.get("RANK", "0"))


def get_logger(name: Optional[str] = None) -> logging.Logger:
    """Logger under the ``megatron_papo`` namespace."""
    return logging.getLogger(_LOGGER_NAME if not name else f"{_LOGGER_NAME}.{name}")


def setup_logging(level: str = "INFO", log_dir: Optional[Path] = None, rank: Optional[int] = None) -> logging.Logger:
    """Console output on rank 0 only (others: warnings and errors), plus ``log_dir/rank{r}.log`` for every rank."""
    rank = _rank() if rank is None else rank
    logger = logging.getLogger(_LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [r{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_dir is not None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / f"rank{rank}.log")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def warn_once(message: str, logger: Optional[logging.Logger] = None) -> None:
    """Log ``message`` as a warning the first time it is seen in this process."""
    if message in _warned:
        return
    _warned.add(message)
    (logger or get_logger()).warning(message)


def progress(iterable: Optional[Iterable[T]] = None, *, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar with ETA on rank 0 (disabled elsewhere or when ``enabled`` is false)."""
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not enabled or _rank() != 0,
                dynamic_ncols=True, file=sys.stderr, leave=True)
