"""Process bookkeeping for engines: remember every descendant, end exactly those (no name-based kills)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class TrackedProcess:
    """A process identified by pid *and* start time, so a recycled pid is never killed."""

    pid: int
    create_time: float

    def alive(self) -> bool:
        """True while this very process (not a later one with the same pid) runs and is not a zombie."""
        try:
            p = psutil.Process(self.pid)
            return p.create_time() == self.create_time and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def track_tree(root_pid: int, extra_pids: tuple[int, ...] = ()) -> list[TrackedProcess]:
    """The root process, all its current descendants and ``extra_pids``, as TrackedProcess records."""
    procs: dict[int, TrackedProcess] = {}
    try:
        root = psutil.Process(root_pid)
        candidates = [root, *root.children(recursive=True)]
    except psutil.Error:
        candidates = []
    for pid in extra_pids:
        try:
            candidates.append(psutil.Process(pid))
        except psutil.Error:
            pass
    for p in candidates:
        try:
            procs[p.pid] = TrackedProcess(p.pid, p.create_time())
        except psutil.Error:
            pass
    return list(procs.values())


def end_processes(tracked: list[TrackedProcess], grace_s: float = 5.0) -> list[int]:
    """SIGTERM the tracked processes that still run, SIGKILL what is left after ``grace_s``.

    Returns the pids that were still alive and had to be ended.
    """
    live = []
    for t in tracked:
        if t.alive():
            try:
                p = psutil.Process(t.pid)
                p.terminate()
                live.append(p)
            except psutil.Error:
                pass
    _, still = psutil.wait_procs(live, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=grace_s)
    time.sleep(0)  # let the OS reap
    return [p.pid for p in live]
