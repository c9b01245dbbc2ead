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
    verify: Literal["size", "checksum"] = field(
        "size", help="manifest written with every checkpoint before 'latest' moves, checked on resume: file sizes "
        "(plus CRC32 of files under 64 MiB), or CRC32 of every file (reads the whole checkpoint on save and resume)")
    preempt_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"], help="signals that mean preemption: the current step is "
        "finished, a checkpoint saved and the run exits 128+signal (143 for SIGTERM); [] = default handling")
    preempt_timeout_s: float = field(
        300.0, help="after a preemption signal, exit (128+signal, without a new checkpoint) if finishing the step "
        "and saving take longer than this; keep it below the scheduler's grace period")
    async_save: bool = field(
        False, help="write the dist-checkpoint's tensor files in the background (megatron-core async save): the next "
        "step runs while they are written; 'latest' moves, the manifest is written and old checkpoints are pruned "
        "only when every rank's files are complete (checked once per step, waited for at the end of the run, on "
        "preemption and on close); at most one save in flight")
    hf_every: int = field(
        0, help="every N steps write an HF export of the actor to <run_dir>/hf/step_XXXXXX (config, tokenizer, "
        "safetensors; loadable by transformers/SGLang): training pauses for the gather only, files are written in "
        "the background and renamed into place when complete; keep_last applies; 0 = off")
    resume: Literal["auto", "never"] = field("auto", help="auto: continue from the latest complete checkpoint")
    init_from: Optional[str] = field(
        None, help="start a new run from these model weights: a dist-checkpoint (megatron-papo convert hf2mcore "
        "output, or a run dir / step dir of an earlier run); actor AND reference start from it, the optimizer and step "
        "start fresh. Ignored when resume finds a checkpoint of this run")
