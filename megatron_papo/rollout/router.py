"""sglang-router (PyPI ``sglang-router``, a Rust binary with a Python launcher) in front of a server fleet.

The fleet starts it with the URLs of its SGLang servers and waits until every one is registered and healthy.
Rollout requests go through it addressed to their engine (``x-smg-target-worker``), so the fleet's deterministic
split of prompts holds, while other clients (a person with curl, an external evaluator) get its load balancing
(``cache_aware``). The router runs in its own process group; :meth:`Router.shutdown` ends exactly the processes
it started.

Correctness first: sglang-router 0.3.2 silently drops ``sampling_params.logit_bias`` (measured: a token banned
through it is still sampled, and its log-probs are those of the unmasked distribution), and the trainer's
banned-id mask travels as a logit bias. :meth:`Router.keeps_logit_bias` probes this once at start (one greedy
token direct, the same request through the router with that token banned); when the bias is lost, the fleet
sends its requests straight to each server and says so in the log.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

from megatron_papo.rollout.base import EngineError
from megatron_papo.rollout.procs import end_processes, track_tree


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    """An ``sglang_router.launch_router`` process over ``worker_urls``."""

    def __init__(self, worker_urls: list[str], *, host: str = "127.0.0.1", port: Optional[int] = None,
                 policy: str = "cache_aware", start_timeout_s: float = 300.0, request_timeout_s: float = 3600.0) -> None:
        self.worker_urls = list(worker_urls)
        self.host, self.port = host, port or _free_port()
        self.url = f"http://{host}:{self.port}"
        self.policy = policy
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self._proc: Optional[subprocess.Popen] = None
        self._tracked: list = []

    def argv(self) -> list[str]:
        """The launch command (health checks lenient: a busy CPU server answers slowly, it is not dead)."""
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", self.host, "--port", str(self.port),
                "--worker-urls", *self.worker_urls, "--policy", self.policy, "--log-level", "warn",
                "--request-timeout-secs", str(int(self.request_timeout_s)), "--disable-circuit-breaker",
                "--disable-retries", "--health-check-timeout-secs", "60", "--health-failure-threshold", "10"]

    def start(self) -> Router:
        """Launch; return once every worker is registered and healthy. Raises EngineError otherwise."""
        if importlib.util.find_spec("sglang_router") is None:
            raise EngineError("rollout.router=true needs the sglang-router package (pip install sglang-router, see "
                              "launch/requirements-cpu.txt) or rollout.router=false")
        self._proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=None, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self._tracked = track_tree(self._proc.pid)
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.shutdown()
                raise EngineError(f"sglang-router exited with code {code} during start")
            if set(self.healthy_workers()) >= set(self.worker_urls):
                return self
            if time.monotonic() > deadline:
                self.shutdown()
                raise EngineError(f"sglang-router at {self.url} did not register {self.worker_urls} within "
                                  f"{self.start_timeout_s:.0f}s")
            time.sleep(0.5)

    def keeps_logit_bias(self, worker_url: str, timeout: float = 120.0) -> bool:
        """Does a request through the router keep its ``logit_bias``? (greedy token direct, then banned via router)"""
        body = {"input_ids": [1, 2, 3, 4], "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}}
        tok = _post(worker_url + "/generate", body, {}, timeout)["output_ids"][0]
        body["sampling_params"]["logit_bias"] = {str(tok): -1e30}
        routed = _post(self.url + "/generate", body, {"x-smg-target-worker": worker_url}, timeout)["output_ids"][0]
        return routed != tok

    def healthy_workers(self) -> list[str]:
        """URLs of the workers the router has registered as healthy ([] while it is not answering)."""
        try:
            with urllib.request.urlopen(self.url + "/workers", timeout=5) as r:
                data = json.loads(r.read())
        except (urllib.error.URLError, OSError, TimeoutError, ValueError):
            return []
        return [w["url"] for w in data.get("workers", []) if w.get("is_healthy", True)]

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pids(self) -> list[int]:
        """Live processes of the router."""
        return [t.pid for t in self._tracked if t.alive()]

    def shutdown(self) -> None:
        """End the router's processes (idempotent)."""
        if self._proc is None:
            return
        tracked, self._tracked = self._tracked or track_tree(self._proc.pid), []
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        end_processes(tracked)
        self._proc.wait(10)
        self._proc = None


def _post(url: str, body: dict, headers: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
