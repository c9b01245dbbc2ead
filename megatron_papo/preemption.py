"""Preemption: on SIGTERM/SIGUSR1 finish the current step, save a checkpoint, log it, exit 128+signal.

Schedulers announce preemption with a signal and kill the job after a grace period (Slurm: ``--signal`` asks
for one ahead of the time limit; Kubernetes: SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``).
:class:`Preemption` only records the signal (a handler must not do collective work). The training loop asks
:meth:`Preemption.requested` between steps; that call all-reduces the flag over the world, so every rank
decides at the same step even when the signal reaches the ranks at different moments. Then the trainer saves
the last finished step, logs ``preempted by SIGTERM: saved step N``, shuts the engine down and exits
``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1: the shell convention for "ended by that signal").

Bounded time: a watchdog started by the first signal ends the process with the same code after
``checkpoint.preempt_timeout_s`` if the step and the save have not finished; a save cut short this way never
becomes ``latest`` (see ``checkpoint/dist.py``), so the previous checkpoint stays the resume point.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_papo.config.base import ConfigError
from megatron_papo.utils.logging import get_logger

log = get_logger("preemption")


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", "15"]`` -> signal enums; ConfigError naming an unknown one."""
    out = []
    for name in names:
        text = str(name).strip().upper()
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
        except (KeyError, ValueError):
            raise ConfigError(f"checkpoint.preempt_signals: unknown signal {name!r}; use names like SIGTERM, SIGUSR1") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"checkpoint.preempt_signals: {sig.name} cannot be caught; use SIGTERM or SIGUSR1")
        out.append(sig)
    return out


class Preemption:
    """Records the first preemption signal; :meth:`requested` is the collective check at a safe point."""

    def __init__(self, signals: Sequence[str], timeout_s: float, install: bool = True) -> None:
        self.signals = parse_signals(signals)
        self.timeout_s = float(timeout_s)
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self._timer: Optional[threading.Timer] = None
        self._previous: dict[int, Any] = {}
        if install:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)

    @property
    def exit_code(self) -> int:
        """128 + the signal number (143 for SIGTERM)."""
        return 128 + int(self.signum or signal.SIGTERM)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "?"

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            log.warning("%s received again; already preempting (exit within %.0f s of the first)",
                        signal.Signals(signum).name, self.timeout_s)
            return
        self.signum, self.received_at = signum, time.monotonic()
        log.warning("%s received: finishing the current step, then saving a checkpoint (at most %.0f s, "
                    "checkpoint.preempt_timeout_s)", self.signal_name, self.timeout_s)
        self._timer = threading.Timer(self.timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        msg = (f"preempted by {self.signal_name}: the step and the save did not finish within {self.timeout_s:.0f} s "
               f"(checkpoint.preempt_timeout_s); exiting {self.exit_code} without a new checkpoint")
        log.error(msg)
        print(f"megatron-papo: {msg}", file=sys.stderr, flush=True)
        os._exit(self.exit_code)

    def requested(self, device: Any = None) -> bool:
        """Collective (every rank, same point of the loop): True when any rank got a preemption signal; then
        every rank also agrees on the signal (the largest number received)."""
        sig = int(self.signum or 0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([sig], dtype=torch.long, device=device if device is not None else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sig = int(t.item())
            if sig and self.signum is None:
                self.signum = sig
        return sig > 0

    def finish(self) -> None:
        """Stop the watchdog and restore the previous handlers (the save is done)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join(timeout=5)
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}
