"""Timeouts and dead hosts give clear errors fast and leave no process behind (a fake host, no SGLang)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from megatron_papo.rollout.base import EngineDiedError, EngineError, EngineTimeoutError
from megatron_papo.rollout.sglang_engine import SGLangEngine


def fake_host(conn, engine_kwargs, env):
    """Stands in for _sglang_host.host_main: owns a 'scheduler' child, obeys ping/hang/die/shutdown."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    conn.send(("ok", {"pid": os.getpid(), "children": [child.pid]}))
    while True:
        method, _ = conn.recv()
        if method == "ping":
            conn.send(("ok", {"pid": os.getpid()}))
        elif method == "fail":
            conn.send(("err", "Traceback: boom"))
        elif method == "hang":
            time.sleep(600)
        elif method == "die":
            os._exit(3)
        elif method == "shutdown":
            child.kill()
            child.wait()
            return


class FakeEngine(SGLangEngine):
    host_target = staticmethod(fake_host)


def _gone(pids):
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


@pytest.fixture
def engine(tiny_model_dir):
    eng = FakeEngine(str(tiny_model_dir), timeout_s=3.0, start_timeout_s=120.0).start()
    yield eng
    eng.shutdown()


def test_clean_shutdown_leaves_nothing(engine):
    pids = engine.pids()
    assert len(pids) >= 2 and engine.health()["ok"]
    engine.shutdown()
    time.sleep(0.2)
    assert _gone(pids)


def test_error_reply_is_raised_and_engine_survives(engine):
    with pytest.raises(EngineError, match="boom"):
        engine._call("fail")
    assert engine.health()["ok"]


def test_timeout_raises_within_limit_and_ends_processes(engine):
    pids = engine.pids()
    t0 = time.monotonic()
    with pytest.raises(EngineTimeoutError, match="did not finish within 3s"):
        engine._call("hang")
    assert time.monotonic() - t0 < 15
    assert _gone(pids)
    with pytest.raises(EngineError, match="not running"):
        engine._call("ping")


def test_dead_host_raises_died_and_ends_its_children(engine):
    pids = engine.pids()
    t0 = time.monotonic()
    with pytest.raises(EngineDiedError, match="died during die"):
        engine._call("die", timeout=60)
    assert time.monotonic() - t0 < 15
    time.sleep(0.2)
    assert _gone(pids)  # the orphaned 'scheduler' was ended too
