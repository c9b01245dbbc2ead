"""Config section ``logging``: console, files and metric sinks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_papo.config.base import field


@dataclass
class LoggingConfig:
    """Where progress and metrics go."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = field("INFO", help="console log level (rank 0)")
    tensorboard: bool = field(True, help="write tensorboard event files to <run_dir>/tensorboard")
    jsonl: bool = field(True, help="write <run_dir>/metrics.jsonl, one line per step")
    progress: bool = field(True, help="show a progress bar with ETA on rank 0")
