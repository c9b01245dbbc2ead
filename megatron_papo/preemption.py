"""Preemption: on SIGTERM/SIGUSR1 finish the current step, save a checkpoint, log it, exit 128+signal.

Schedulers announce preemption with a signal and kill the job after a grace period (Slurm: ``--signal`` asks
for one ahead of the time limit; Kubernetes: SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``).
:class:`Preemption` only records the signal (a handler must not do collective work, nor log: see the class). The training loop asks
:meth:`Preemption.requested` between steps; that call all-reduces the flag over the world, so every rank
decides at the same step even when the signal reaches the ranks at different moments. Then the trainer saves
the last finished step, logs ``preempted by SIGTERM: saved step N``, shuts the engine down and exits
``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1: the shell convention for "ended by that signal").

Bounded time: a watchdog thread ends the process with the same code ``checkpoint.preempt_timeout_s`` after the
first signal if the step and the save have not finished; a save cut short this way never
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
    """Records the first preemption signal; :meth:`requested` is the collective check at a safe point.

    The handler is async-signal-safe in Python's sense: it sets two attributes and writes one line to fd 2 with
    ``os.write``. It takes no lock, starts no thread and never calls ``logging``: Python runs handlers on the
    main thread between bytecodes, so a handler that logs can land inside the main thread's own ``flush`` of the
    same stream and fail with ``RuntimeError: reentrant call inside <_io.BufferedWriter>``. The log record of the
    signal is written by :meth:`requested` on the main thread; the watchdog is a thread started with the handlers
    that polls :attr:`received_at`.
    """

    POLL_S = 0.2

    def __init__(self, signals: Sequence[str], timeout_s: float, install: bool = True) -> None:
        self.signals = parse_signals(signals)
        self.timeout_s = float(timeout_s)
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self._repeats = 0
        self._logged = False
        self._done = threading.Event()
        self._watchdog: Optional[threading.Thread] = None
        self._previous: dict[int, Any] = {}
        if install:
            self._watchdog = threading.Thread(target=self._watch, name="preemption-watchdog", daemon=True)
            self._watchdog.start()
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
            self._repeats += 1
            _write_stderr(f"megatron-papo: {signal.Signals(signum).name} received again; already preempting "
                          f"(exit within {self.timeout_s:.0f} s of the first)\n")
            return
        self.received_at = time.monotonic()
        self.signum = signum
        _write_stderr(f"megatron-papo: {self.signal_name} received: finishing the current step, then saving a "
                      f"checkpoint (at most {self.timeout_s:.0f} s, checkpoint.preempt_timeout_s)\n")

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_S):
            t0 = self.received_at
            if t0 is not None and time.monotonic() - t0 >= self.timeout_s:
                self._expire()

    def _expire(self) -> None:
        msg = (f"preempted by {self.signal_name}: the step and the save did not finish within {self.timeout_s:.0f} s "
               f"(checkpoint.preempt_timeout_s); exiting {self.exit_code} without a new checkpoint")
        log.error(msg)
        print(f"megatron-papo: {msg}", file=sys.stderr, flush=True)
        os._exit(self.exit_code)

    def requested(self, device: Any = None) -> bool:
        """Collective (every rank, same point of the loop): True when any rank got a preemption signal; then
        every rank also agrees on the signal (the largest number received). Logs the local signal once."""
        sig = int(self.signum or 0)
        if sig and self.received_at is not None and not self._logged:  # a signal this process got itself
            self._logged = True
            log.warning("%s received %.1f s ago (%d repeat(s)): finishing, saving a checkpoint (at most %.0f s "
                        "from the signal, checkpoint.preempt_timeout_s)", self.signal_name,
                        time.monotonic() - self.received_at, self._repeats, self.timeout_s)
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([sig], dtype=torch.long, device=device if device is not None else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sig = int(t.item())
            if sig and self.signum is None:
                self.signum = sig
        return sig > 0

    def finish(self) -> None:
        """Stop the watchdog and restore the previous handlers (the save is done)."""
        self._done.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}


def _write_stderr(text: str) -> None:
    """One unbuffered write to fd 2 (no Python-level lock or buffer: safe inside a signal handler)."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass
