"""SGLang in server mode (``rollout.mode=server``): ``python -m sglang.launch_server`` driven over HTTP.

Same protocol and behaviour as :class:`SGLangEngine` (it subclasses it): the server process group is
started and ended by this object (no orphans), every call has a timeout, a dead server raises
:class:`EngineDiedError`. Only the host transport differs: each host method maps to one SGLang HTTP
endpoint. Differences forced by JSON: banned ids get a logit bias of ``-1e30`` instead of ``-inf``
(the same zero probability after the softmax); images travel as base64 PNG data URLs. The ``tensor``
weight transport passes shared-memory handles, so it needs the server on the same machine; use
``distributed`` (NCCL/gloo) or ``disk`` for a remote server.

In a fleet (``rollout/fleet.py``) the servers sit behind sglang-router (``rollout/router.py``): with
``router_url`` set, generation requests go to the router, addressed to this server with its
``x-smg-target-worker`` header (the fleet decides which engine serves which prompts); weight updates and
control calls go to the server itself. :class:`ExternalServerEngine` attaches to a server that someone
else started (``rollout.server_urls``, e.g. engines on other nodes): it never starts or ends processes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from megatron_papo.rollout.base import EngineError, EngineTimeoutError
from megatron_papo.rollout.procs import track_tree
from megatron_papo.rollout.sglang_engine import SGLangEngine

BAN_BIAS = -1e30

ROUTES: dict[str, str] = {
    "update_disk": "/update_weights_from_disk", "init_group": "/init_weights_update_group",
    "destroy_group": "/destroy_weights_update_group", "update_distributed": "/update_weights_from_distributed",
    "update_serialized": "/update_weights_from_tensor", "begin_update": "/begin_weight_update",
    "end_update": "/end_weight_update", "flush_cache": "/flush_cache", "release": "/release_memory_occupation",
    "resume": "/resume_memory_occupation", "generate": "/generate",
}


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argv(kwargs: dict[str, Any], host: str, port: int) -> list[str]:
    """``python -m sglang.launch_server`` arguments from ``sglang.Engine`` keyword arguments (launched through
    ``_sglang_server_main``, which adds the CPU seeded-sampling plumbing to SGLang's own launcher)."""
    argv = [sys.executable, "-m", "megatron_papo.rollout._sglang_server_main", "--host", host, "--port", str(port)]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


class SGLangServerEngine(SGLangEngine):
    """:class:`SGLangEngine` over an SGLang HTTP server that this object launches and owns."""

    #: flat CPU buckets are moved to shared memory *by file name* while pickling (see ``_flat_payload``)
    shared_flat = False

    def __init__(self, model_path: str, *, host: str = "127.0.0.1", port: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(model_path, **kwargs)
        self.host, self.port = host, port or _free_port()
        self.url = f"http://{host}:{self.port}"
        self._pending: Optional[tuple[threading.Thread, dict[str, Any]]] = None
        #: sglang-router in front of this server (generation goes through it, addressed to this server)
        self.router_url: Optional[str] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SGLangServerEngine:
        """Launch the server, wait until ``/health_generate`` answers (``start_timeout_s``)."""
        if self._proc is not None:
            return self
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                  "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        env["SGLANG_VLM_CACHE_SIZE_MB"] = "0"
        if self.device == "cpu":
            from megatron_papo.rollout.cpu_shim import SHIM_DIR

            env["SGLANG_USE_CPU_ENGINE"] = "1"
            env["PYTHONPATH"] = os.pathsep.join([SHIM_DIR, env.get("PYTHONPATH", "")])
        self._proc = subprocess.Popen(server_argv(self.engine_kwargs, self.host, self.port), env=env,
                                      stdout=subprocess.DEVNULL, stderr=None, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self._tracked = track_tree(self._proc.pid)
            if self._proc.poll() is not None:
                self._died("start", None)
            try:
                if self._http("GET", "/health_generate", None, 30)[0] == 200:
                    break
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self._kill()
                raise EngineTimeoutError(f"SGLang server did not become healthy within {self.start_timeout_s:.0f}s")
            time.sleep(1.0)
        self._tracked = track_tree(self._proc.pid)
        self._vital = [t for t in self._tracked if t.pid == self._proc.pid]  # the server's main process
        return self

    def _kill(self) -> None:
        tracked, self._tracked, self._vital = self._tracked, [], []
        self._conn = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        from megatron_papo.rollout.procs import end_processes

        end_processes(tracked)
        if self._proc is not None:
            self._proc.wait(10)
            self._proc = None

    def shutdown(self) -> None:
        """Stop the server and every process it started (idempotent)."""
        if self._proc is not None:
            self._kill()

    # ------------------------------------------------------------------ host calls over HTTP
    def _http(self, verb: str, path: str, body: Optional[dict], timeout: float, via_router: bool = False
              ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        base = self.url
        if via_router and self.router_url:
            base, headers["x-smg-target-worker"] = self.router_url, self.url
        req = urllib.request.Request(base + path, data=data, method=verb, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            try:
                return r.status, json.loads(raw) if raw else None
            except json.JSONDecodeError:
                return r.status, raw.decode(errors="replace")

    def _body(self, method: str, kwargs: dict[str, Any]) -> tuple[str, str, Optional[dict]]:
        if method == "ping":
            return "GET", "/health", None
        if method == "update_flat":
            return "POST", ROUTES["update_serialized"], self._flat_payload(**kwargs)
        if method not in ROUTES:
            raise EngineError(f"server mode has no route for {method}")
        body = dict(kwargs)
        if method == "generate":
            body["sampling_params"] = [{**sp, "logit_bias": {k: BAN_BIAS for k in sp.get("logit_bias", {})}}
                                       if "logit_bias" in sp else sp for sp in body["sampling_params"]]
            if body.get("image_data") is not None:
                body["image_data"] = [[_data_url(im) for im in ims] for ims in body["image_data"]]  # [] if none
            sps = body["sampling_params"]
            if self.router_url and all(sp == sps[0] for sp in sps):
                body["sampling_params"] = sps[0]  # sglang-router takes one sampling_params object per batch
        if method == "update_serialized":
            body = {"serialized_named_tensors": body["payloads"], "load_format": body["load_format"],
                    "flush_cache": body["flush_cache"]}
        return "POST", ROUTES[method], body

    def _flat_payload(self, flat: Any, meta: list, flush_cache: bool) -> dict:
        """SGLang's flattened_bucket payload (shared-memory handles: same machine only).

        CPU tensors are shared by shm file name (torch's ``file_system`` strategy, set only while
        pickling): the default fd passing needs multiprocessing's authkey, which an unrelated server
        process does not have (it fails and takes the scheduler down).
        """
        from multiprocessing.reduction import ForkingPickler

        import torch
        import torch.multiprocessing as tmp
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        metadata = [FlattenedTensorMetadata(name=n, shape=torch.Size(shape), dtype=getattr(torch, dt), start_idx=s,
                                            end_idx=e, numel=e - s) for n, shape, dt, s, e in meta]
        from megatron_papo.rollout.weight_transport import per_rank_payloads

        def serialize(obj: Any) -> str:  # one per TP rank: each pickling takes one shm reference for its receiver
            buf = io.BytesIO()
            ForkingPickler(buf).dump(obj)
            return base64.b64encode(buf.getvalue()).decode()

        old = tmp.get_sharing_strategy()
        tmp.set_sharing_strategy("file_system")
        try:
            payloads = per_rank_payloads({"flattened_tensor": flat, "metadata": metadata},
                                         int(self.engine_kwargs.get("tp_size", 1)), serialize)
        finally:
            tmp.set_sharing_strategy(old)
        self._keepalive = flat  # the server maps the shared memory while it loads
        return {"serialized_named_tensors": payloads, "load_format": "flattened_bucket", "flush_cache": flush_cache}

    def _running(self) -> bool:
        return self._proc is not None

    def _dead(self) -> Optional[list[int]]:
        """None while the server runs; else the pids found dead (possibly empty)."""
        dead = [p.pid for p in self._vital if not p.alive()]
        if dead or self._proc is None or self._proc.poll() is not None:
            return dead
        return None

    def _send(self, method: str, **kwargs: Any) -> None:
        if not self._running():
            raise EngineError(f"SGLang server is not running (call start() first); cannot {method}")
        verb, path, body = self._body(method, kwargs)
        box: dict[str, Any] = {}

        def run() -> None:
            # a batch with per-request sampling params (per-sample seeds) cannot pass the router: straight to the server
            routed = method == "generate" and isinstance(body["sampling_params"], dict)
            try:
                box["result"] = self._http(verb, path, body, self.timeout_s + 5, via_router=routed)
            except urllib.error.HTTPError as e:
                box["error"] = f"HTTP {e.code}: {e.read().decode(errors='replace')[:4000]}"
            except Exception as e:  # connection refused/reset: judged by the liveness check in _recv
                box["exc"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self._pending = (t, box)

    def _recv(self, method: str, timeout: Optional[float] = None) -> Any:
        timeout = self.timeout_s if timeout is None else timeout
        if self._pending is None:
            raise EngineError(f"no pending request for {method}")
        t, box = self._pending
        deadline = time.monotonic() + timeout
        while t.is_alive():
            t.join(0.2)
            dead = self._dead()
            if dead is not None:
                self._died(method, None, dead)
            if time.monotonic() > deadline:
                self._kill()
                raise EngineTimeoutError(f"SGLang server {method} did not finish within {timeout:.0f}s "
                                         f"(rollout.timeout_s); the server was shut down")
        self._pending = None
        if "exc" in box:
            if method == "generate" and self.router_url and self._dead() is None:
                raise EngineError(f"sglang-router at {self.router_url} failed to serve {self.url}: {box['exc']!r}")
            self._died(method, box["exc"])
        if "error" in box:
            raise EngineError(f"SGLang server {method} failed: {box['error']}")
        return box["result"][1]

    def _died(self, method: str, err: Optional[BaseException], dead: Any = ()) -> None:
        code = self._proc.poll() if self._proc is not None else None
        self._kill()
        from megatron_papo.rollout.base import EngineDiedError

        raise EngineDiedError(f"SGLang server died during {method} (exit code {code}, dead pids {list(dead)}"
                              f"{', ' + repr(err) if err else ''}); its processes were ended")

    def health(self, timeout: float = 30.0) -> dict[str, Any]:
        """``{"ok", "pids", "host_pid"}`` (host = the server's main process)."""
        if self._proc is None:
            return {"ok": False, "pids": [], "host_pid": None}
        try:
            self._call("ping", timeout)
            return {"ok": True, "pids": self.pids(), "host_pid": self._proc.pid}
        except EngineError as e:
            return {"ok": False, "pids": self.pids(), "host_pid": None, "error": str(e)}


class ExternalServerEngine(SGLangServerEngine):
    """An SGLang server started by someone else (``rollout.server_urls``: e.g. a fleet's engines on other nodes).

    Same calls as :class:`SGLangServerEngine`; it starts and ends no process. The server counts as dead when it
    stops answering (connection refused/reset) -- the error names its URL. Weight updates must use
    ``rollout.transport=distributed`` or ``disk`` (shared memory does not cross machines).
    """

    external = True

    def __init__(self, model_path: str, *, url: str, **kwargs: Any) -> None:
        from urllib.parse import urlparse

        u = urlparse(url if "://" in url else f"http://{url}")
        super().__init__(model_path, host=u.hostname or "127.0.0.1", port=u.port or 80, **kwargs)
        self._attached = False

    @classmethod
    def from_config(cls, cfg: Any, model_path: str, **kwargs: Any) -> ExternalServerEngine:  # type: ignore[override]
        """Attach to ``kwargs["url"]`` with the rollout section's timeouts, transport and TP size."""
        extra = dict(getattr(cfg, "engine_kwargs", None) or {})
        return cls(model_path, tp_size=getattr(cfg, "engine_tp", 1), timeout_s=cfg.timeout_s,
                   start_timeout_s=getattr(cfg, "start_timeout_s", 900.0), seed=cfg.seed, transport=cfg.transport,
                   bucket_mb=cfg.bucket_mb, engine_kwargs=extra, **kwargs)

    def start(self) -> ExternalServerEngine:
        """Wait until the server answers ``/health_generate`` (``start_timeout_s``)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                if self._http("GET", "/health_generate", None, 30)[0] == 200:
                    break
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise EngineTimeoutError(f"external SGLang server {self.url} did not answer within {self.start_timeout_s:.0f}s")
            time.sleep(1.0)
        self._attached = True
        return self

    def _running(self) -> bool:
        return self._attached

    def _dead(self) -> Optional[list[int]]:
        return None if self._attached else []

    def _kill(self) -> None:
        self._attached = False
        self._conn = None

    def shutdown(self) -> None:
        """Detach (the server belongs to whoever started it)."""
        self._kill()

    def pids(self) -> list[int]:
        return []

    @property
    def host_pid(self) -> Optional[int]:
        return None

    def _died(self, method: str, err: Optional[BaseException], dead: Any = ()) -> None:
        self._kill()
        from megatron_papo.rollout.base import EngineDiedError

        raise EngineDiedError(f"external SGLang server {self.url} stopped answering during {method}"
                              f"{': ' + repr(err) if err else ''}")

    def health(self, timeout: float = 30.0) -> dict[str, Any]:
        """``{"ok", "pids": [], "host_pid": None}``."""
        try:
            self._call("ping", timeout)
            return {"ok": True, "pids": [], "host_pid": None}
        except EngineError as e:
            return {"ok": False, "pids": [], "host_pid": None, "error": str(e)}
