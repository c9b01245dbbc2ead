"""Config section ``logging``: console, metric sinks and experiment trackers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_papo.config.base import ConfigError, field

BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")


@dataclass
class LoggingConfig:
    """Where progress and metrics go (rank 0)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = field("INFO", help="console log level (rank 0)")
    backends: list[str] = field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        help="metric sinks, any of jsonl (<run_dir>/metrics.jsonl), tensorboard (<run_dir>/tensorboard), wandb, "
        "mlflow; e.g. logging.backends=jsonl,tensorboard,wandb. wandb/mlflow need their packages "
        "(pip install 'megatron_papo[trackers]') and resume the same tracker run when the training run resumes")
    project: str = field("megatron_papo", help="wandb project / mlflow experiment name")
    run_name: Optional[str] = field(None, help="tracker run name; null = the run dir's name")
    wandb_mode: Optional[Literal["online", "offline"]] = field(
        None, help="wandb mode; null = the WANDB_MODE environment variable, else offline (files in <run_dir>/wandb, "
        "upload later with `wandb sync`)")
    mlflow_tracking_uri: Optional[str] = field(
        None, help="mlflow tracking URI (http://server, sqlite:///db, file:///dir); null = MLFLOW_TRACKING_URI, else "
        "the local file store <run_dir>/mlruns")
    progress: bool = field(True, help="show a progress bar with ETA on rank 0")

    def __post_init__(self) -> None:
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ConfigError(f"logging.backends: unknown backend(s) {bad}; choose from {list(BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"logging.backends: {self.backends} names a backend twice; list each once")
