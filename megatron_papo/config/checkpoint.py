"""Config section ``checkpoint``: saving and resuming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_papo.config.base import field


@dataclass
class CheckpointConfig:
    """Megatron-Core dist-checkpoints in ``<run_dir>/checkpoints``."""

    save_every: int = field(5, help="save every N training steps; 0 = only at the end")
    keep_last: int = field(3, help="keep the newest K checkpoints")
    resume: Literal["auto", "never"] = field("auto", help="auto: continue from the latest complete checkpoint")
