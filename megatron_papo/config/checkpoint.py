"""Config section ``checkpoint``: saving and resuming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_papo.config.base import field


@dataclass
class CheckpointConfig:
    """Megatron-Core dist-checkpoints in ``<run_dir>/checkpoints``."""

    save_every: int = field(5, help="save every N training steps; 0 = only at the end")
    keep_last: int = field(3, help="keep the newest K checkpoints")
    resume: Literal["auto", "never"] = field("auto", help="auto: continue from the latest complete checkpoint")
    init_from: Optional[str] = field(
        None, help="start a new run from these model weights: a dist-checkpoint (megatron-papo convert hf2mcore "
        "output, or a run dir / step dir of an earlier run); actor AND reference start from it, the optimizer and step "
        "start fresh. Ignored when resume finds a checkpoint of this run")
