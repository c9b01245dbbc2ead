"""Preemption signal handling (megatron_papo/preemption.py) and the consecutive-skip guard (nonfinite.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_papo.config.base import ConfigError
from megatron_papo.errors import DivergedError
from megatron_papo.nonfinite import SkippedSteps
from megatron_papo.preemption import Preemption, parse_signals
from tests.harness import REPO


def test_parse_signals():
    assert parse_signals(["SIGTERM", "usr1", "15"]) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM]
    with pytest.raises(ConfigError, match="unknown signal 'SIGNOPE'"):
        parse_signals(["SIGNOPE"])
    with pytest.raises(ConfigError, match="SIGKILL cannot be caught"):
        parse_signals(["SIGKILL"])


def test_signal_is_recorded_not_acted_on_and_handlers_restored():
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption(["SIGUSR1"], timeout_s=60)
    try:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert p.requested() and p.exit_code == 128 + signal.SIGUSR1 == 138 and p.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal changes nothing
        assert p.exit_code == 138
    finally:
        p.finish()
    assert signal.getsignal(signal.SIGUSR1) == before and not p._watchdog.is_alive()


WATCHDOG = """
import os, signal, time
from megatron_papo.preemption import Preemption
p = Preemption(["SIGTERM"], timeout_s=0.5)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)  # a step that never finishes
"""


def test_watchdog_bounds_the_time_and_exits_with_the_signal_code():
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-c", WATCHDOG], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 143 and time.monotonic() - t < 25
    assert "did not finish within 0 s" in r.stderr or "did not finish within 1 s" in r.stderr, r.stderr


SIGNALS_DURING_LOGGING = """
import logging, os, signal, sys, threading, time
from megatron_papo.preemption import Preemption
logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[logging.FileHandler(sys.argv[1]), logging.StreamHandler()])
p = Preemption(["SIGUSR1"], timeout_s=600)
def pester():  # signals land while the main thread is inside the handlers' write/flush
    for _ in range(300):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.002)
t = threading.Thread(target=pester)
t.start()
n = 0
while t.is_alive():
    logging.getLogger("x").info("line %d %s", n, "x" * 500)
    n += 1
assert p.requested()
p.finish()
print(n)
"""


def test_signals_during_logging_do_not_reenter_the_log_streams(tmp_path):
    """The handler must not log: a signal that lands inside the main thread's flush of a log stream used to fail
    with 'reentrant call inside <_io.BufferedWriter>' (seen in CI on the SIGTERM resume test)."""
    log_file = tmp_path / "rank0.log"
    r = subprocess.run([sys.executable, "-c", SIGNALS_DURING_LOGGING, str(log_file)], capture_output=True, text=True,
                       timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "reentrant" not in r.stderr and "Logging error" not in r.stderr, r.stderr[-4000:]
    assert r.stderr.count("SIGUSR1 received: finishing the current step") == 1
    assert r.stderr.count("SIGUSR1 received again") >= 1
    lines = log_file.read_text().splitlines()
    n = int(r.stdout.strip())
    assert [ln.split()[1] for ln in lines if ln.startswith("line ")] == [str(i) for i in range(n)]
    assert sum("SIGUSR1 received" in ln and "repeat(s)" in ln for ln in lines) == 1  # logged once, by requested()


def test_consecutive_skips_stop_the_run():
    g = SkippedSteps(2)
    g.update(1, 1)
    g.update(2, 0)  # a clean step resets the count
    g.update(3, 1)
    with pytest.raises(DivergedError, match=r"step 4: 2 consecutive steps .*optim.max_skipped_steps=2"):
        g.update(4, 1, float("nan"))
    never = SkippedSteps(0)
    for s in range(1, 50):
        never.update(s, 1)
    assert never.consecutive == 49
