"""Rewards in worker processes with a per-call timeout: a reward that hangs or raises scores 0, never kills the run.

``RewardPool(spec, ...)`` is the plain callable ``reward_fn(responses, answers, ids=None) -> list[dict]`` the
rollout code and evaluation call. With ``workers > 0`` each call is split into one contiguous chunk per
worker, and each chunk is one call of the reward function in a worker process (``spawn``: safe inside
torchrun ranks that run threads; workers import only the reward modules, not torch). A chunk that raises,
returns a bad result, outlives ``timeout_s`` (the worker is killed and replaced) or loses its worker is
scored again one response per call, so only the responses that fail themselves score 0. Each such
response is counted (:attr:`failures`), marked ``reward_failed: 1.0`` in its dict (``reward/failed`` in
the step metrics) and logged with its sample id.

Workers start on the first call (only the ranks that score start any), are daemonic, exit when their
pipe closes, and a watchdog thread ends them if the parent process dies while they are busy.
With ``workers == 0`` the function runs in the calling process (failures still score 0; no timeout).
Calls are thread-safe: a rank that owns several engines scores their blocks from several fleet threads, and
one lock keeps each worker's request/answer pairs (and the ready handshake) from interleaving.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any, Optional, Sequence

from megatron_papo.rewards.plugin import call_kwargs, check_results, resolve_reward
from megatron_papo.utils.logging import get_logger

log = get_logger("rewards")
FAILED = {"overall": 0.0, "accuracy": 0.0, "format": 0.0, "reward_failed": 1.0}
_CONSOLE_FAILURES_PER_CALL = 8
_READY_TIMEOUT_S = 300.0  # a fresh worker imports the reward modules (mathruler/sympy) on a possibly loaded host


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(conn: Connection, spec: str, format_weight: float, parent_pid: int) -> None:
    """Worker loop: load the reward function, then score ``(responses, answers)`` chunks until the pipe closes."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        fn = resolve_reward(spec)
        kwargs = call_kwargs(fn, format_weight)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"loading {spec} failed: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            responses, answers = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", check_results(fn(responses, answers, **kwargs), len(responses))))
        except BaseException as e:  # noqa: BLE001 - any failure of user code scores 0, SystemExit included
            conn.send(("error", f"{type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, ctx: Any, spec: str, format_weight: float) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, spec, format_weight, os.getpid()), daemon=True,
                                name="megatron-papo-reward")
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(_READY_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"reward worker did not start within {_READY_TIMEOUT_S:.0f}s")
        kind, msg = self.conn.recv()
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"reward worker: {msg}")
        self.ready = True

    def stop(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)


def _stop_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.stop()
    workers.clear()


class RewardPool:
    """``reward_fn(responses, answers, ids=None) -> list[dict]`` over worker processes (see module docstring)."""

    #: ``rewards.score`` passes the samples' ids (``step<s>/uid<u>/<k>``) for the failure log
    takes_sample_ids = True

    def __init__(self, spec: str, *, format_weight: float = 0.1, workers: int = 2, timeout_s: float = 30.0,
                 start_method: str = "spawn") -> None:
        self.spec, self.format_weight, self.num_workers, self.timeout_s = spec, format_weight, workers, timeout_s
        fn = resolve_reward(spec)  # fail early (one line) on a bad name, path or import
        self._fn, self._kwargs = fn, call_kwargs(fn, format_weight)
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        self.failures = 0
        self.calls = 0
        self._lock = threading.Lock()  # one call at a time: the pipes carry one request/answer pair each

    # ------------------------------------------------------------------ public
    def __call__(self, responses: Sequence[str], answers: Sequence[str],
                 ids: Optional[Sequence[str]] = None) -> list[dict[str, float]]:
        """One reward dict per response; failed ones are ``FAILED`` (0, marked, counted, logged)."""
        if len(responses) != len(answers):
            raise ValueError(f"got {len(responses)} responses but {len(answers)} answers; pass one answer per response")
        n = len(responses)
        if n == 0:
            return []
        responses, answers = list(responses), list(answers)
        with self._lock:
            self.calls += 1
            ids = list(ids) if ids is not None else [f"call{self.calls}/{i}" for i in range(n)]
            results = self._local(responses, answers) if self.num_workers == 0 else self._pooled(responses, answers)
            return self._collect(results, ids, n)

    def _collect(self, results: list[Any], ids: list[str], n: int) -> list[dict[str, float]]:
        """Reward dicts in order; a failure becomes ``FAILED``, counted and logged with its sample id."""
        out, failed = [], 0
        for i, r in enumerate(results):
            if isinstance(r, dict):
                out.append(r)
                continue
            self.failures += 1
            failed += 1
            # every failure is in the rank's log file; the console gets the first few of a call
            level = logging.WARNING if failed <= _CONSOLE_FAILURES_PER_CALL else logging.DEBUG
            log.log(level, "reward %s failed for sample %s (scored 0; %d failures so far): %s", self.spec, ids[i],
                    self.failures, r)
            out.append(dict(FAILED))
        if failed > _CONSOLE_FAILURES_PER_CALL:
            log.warning("reward %s: %d of %d samples of this call failed (all listed in the log file)", self.spec,
                        failed, n)
        return out

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            _stop_all(self._workers)

    # ------------------------------------------------------------------ in process
    def _local(self, responses: list[str], answers: list[str]) -> list[Any]:
        def run(r: list[str], a: list[str]) -> Any:
            try:
                return check_results(self._fn(r, a, **self._kwargs), len(r))
            except Exception as e:  # noqa: BLE001 - user code
                return f"{type(e).__name__}: {e}"[:500]

        res = run(responses, answers)
        if isinstance(res, list):
            return res
        if len(responses) == 1:
            return [res]
        singles = [run([r], [a]) for r, a in zip(responses, answers)]
        return [s[0] if isinstance(s, list) else s for s in singles]

    # ------------------------------------------------------------------ worker pool
    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.spec, self.format_weight))
        for w in self._workers:
            w.wait_ready()

    def _replace(self, w: _Worker) -> None:
        w.stop()
        i = self._workers.index(w)
        self._workers[i] = _Worker(self._ctx, self.spec, self.format_weight)
        self._workers[i].wait_ready()

    def _pooled(self, responses: list[str], answers: list[str]) -> list[Any]:
        n = len(responses)
        self._ensure_workers()
        k = min(self.num_workers, n)
        bounds = [(c * n // k, (c + 1) * n // k) for c in range(k)]
        first = self._run_tasks([(b, responses[b[0]:b[1]], answers[b[0]:b[1]]) for b in bounds])
        results: list[Any] = [None] * n
        retry = []
        for (lo, hi), (kind, val) in first.items():
            if kind == "ok":
                results[lo:hi] = val
            elif hi - lo == 1:
                results[lo] = val
            else:
                retry.extend(range(lo, hi))
        if retry:  # score the responses of failed chunks one per call: only the bad ones fail
            again = self._run_tasks([((i, i + 1), [responses[i]], [answers[i]]) for i in retry])
            for (lo, _hi), (kind, val) in again.items():
                results[lo] = val[0] if kind == "ok" else val
        return results

    def _run_tasks(self, tasks: list[tuple[Any, list[str], list[str]]]) -> dict[Any, tuple[str, Any]]:
        """Run ``(key, responses, answers)`` tasks on the workers, one at a time per worker, each under the timeout."""
        pending = list(tasks)
        busy: dict[int, tuple[Any, float]] = {}  # worker index -> (task key, deadline)
        done: dict[Any, tuple[str, Any]] = {}
        while pending or busy:
            for i, w in enumerate(self._workers):
                if i not in busy and pending:
                    key, r, a = pending.pop(0)
                    try:
                        w.conn.send((r, a))
                    except (BrokenPipeError, OSError):
                        done[key] = ("error", "reward worker died before the call")
                        self._replace(w)
                        continue
                    busy[i] = (key, time.monotonic() + self.timeout_s)
            if not busy:
                continue
            left = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            conns = {self._workers[i].conn: i for i in busy}
            for conn in wait(list(conns), timeout=left):
                i = conns[conn]
                key, _ = busy.pop(i)
                try:
                    done[key] = conn.recv()
                except (EOFError, OSError):
                    code = self._workers[i].proc.exitcode
                    done[key] = ("error", f"reward worker died during the call (exit code {code})")
                    self._replace(self._workers[i])
            now = time.monotonic()
            for i, (key, deadline) in list(busy.items()):
                if now >= deadline and not self._workers[i].conn.poll():  # (a result that arrived is read next turn)
                    busy.pop(i)
                    done[key] = ("error", f"timed out after {self.timeout_s:g}s (worker killed and replaced)")
                    self._replace(self._workers[i])
        return done
