"""Reward plugins (``data.reward=file.py:fn``) and the worker pool: exact scores against the functions called
directly, failures (raise, hang past the timeout, worker death, bad results) score 0 per sample with the sample id
logged and never stop the pool, and workers die with their parent."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_papo.config import ConfigError, load_config
from megatron_papo.rewards import build_reward_fn, get_reward_fn
from megatron_papo.rewards.pool import FAILED, RewardPool
from tests.harness import REPO

PLUGIN = textwrap.dedent('''
    import math, os, time

    def exact(responses, answers):
        """1 for an exact match, plus the response length / 100 (a number no built-in reward gives)."""
        return [{"overall": float(r == a) + len(r) / 100, "accuracy": float(r == a)} for r, a in zip(responses, answers)]

    def weighted(responses, answers, format_weight=0.1):
        return [{"overall": format_weight * len(r)} for r in responses]

    def flaky(responses, answers):
        out = []
        for r, a in zip(responses, answers):
            if r == "boom":
                raise ZeroDivisionError("boom")
            if r == "hang":
                time.sleep(3600)
            if r == "die":
                os._exit(3)
            out.append({"overall": float("nan") if r == "nan" else float(r == a), "accuracy": float(r == a)})
        return out

    def short(responses, answers):
        return [{"overall": 1.0}]
''')


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(PLUGIN)
    return str(path)


def _exact(r, a):
    return {"overall": float(r == a) + len(r) / 100, "accuracy": float(r == a)}


def test_plugin_through_the_pool_equals_direct_call(plugin):
    responses, answers = ["red", "blue", "green", "red", "x"], ["red", "red", "green", "blue", "x"]
    want = [_exact(r, a) for r, a in zip(responses, answers)]
    assert get_reward_fn(f"{plugin}:exact")(responses, answers) == want
    for workers in (0, 2):
        pool = RewardPool(f"{plugin}:exact", workers=workers, timeout_s=60)
        try:
            assert pool(responses, answers) == want
            assert pool(responses[:1], answers[:1]) == want[:1] and pool([], []) == []
            assert pool.failures == 0
        finally:
            pool.close()
    # format_weight reaches functions that take it
    cfg = load_config(None, [f"data.reward={plugin}:weighted", "data.format_weight=0.5", "data.reward_workers=0"])
    assert build_reward_fn(cfg.data)(["abcd"], ["x"]) == [{"overall": 2.0}]


def test_concurrent_calls_from_fleet_threads_each_get_their_own_results(plugin):
    """A rank that owns two engines scores both engines' blocks from two fleet threads at once, starting with the
    workers' ready handshake: every thread gets exactly its own answers (before the lock a thread could read another
    thread's results as the handshake and fail with ``reward worker: [...]``)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = RewardPool(f"{plugin}:exact", workers=2, timeout_s=120)
    calls = [([f"r{t}_{i}" * (1 + t % 3) for i in range(5)], [f"r{t}_{i}" for i in range(5)]) for t in range(12)]
    try:
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda c: pool(*c), calls))
        assert got == [[_exact(r, a) for r, a in zip(*c)] for c in calls] and pool.failures == 0
    finally:
        pool.close()


def test_registry_names_still_work_through_the_pool():
    from megatron_papo.rewards.math import math_reward
    from megatron_papo.rewards.synthetic import synthetic_reward

    responses = ["<think>a</think>\\boxed{4}", "red", " Red. ", "\\boxed{blue}", "no"]
    answers = ["4", "red", "red", "blue", "yes"]
    pool = RewardPool("synthetic", workers=1, format_weight=0.3, timeout_s=60)
    try:
        assert pool(responses, answers) == synthetic_reward(responses, answers, format_weight=0.3)
    finally:
        pool.close()
    pool = RewardPool("math", workers=0)
    assert pool(responses, answers) == math_reward(responses, answers)


def test_failures_score_zero_per_sample_are_counted_logged_and_never_stop_the_pool(plugin, caplog):
    caplog.set_level(logging.WARNING, logger="megatron_papo")
    pool = RewardPool(f"{plugin}:flaky", workers=2, timeout_s=2.0)
    try:
        responses = ["red", "boom", "blue", "hang", "red", "die", "nan", "blue"]
        answers = ["red", "red", "red", "red", "red", "red", "red", "blue"]
        ids = [f"uid7/{k}" for k in range(len(responses))]
        t = time.monotonic()
        out = pool(responses, answers, ids=ids)
        took = time.monotonic() - t
        ok = {"overall": 1.0, "accuracy": 1.0}
        miss = {"overall": 0.0, "accuracy": 0.0}
        assert out == [ok, FAILED, miss, FAILED, ok, FAILED, FAILED, ok]
        assert pool.failures == 4
        msgs = {r.getMessage() for r in caplog.records}
        for k, why in ((1, "ZeroDivisionError: boom"), (3, "timed out after 2s"), (5, "died during the call"),
                       (6, "'overall' = nan is not finite")):
            assert any(f"sample uid7/{k} " in m and why in m for m in msgs), (k, why, msgs)
        assert took < 60, took  # two timeouts (chunk, then the sample alone) plus worker restarts
        # the pool keeps working, with live workers
        assert pool(["red", "blue"], ["red", "red"]) == [ok, miss]
        assert all(w.proc.is_alive() for w in pool._workers)
        # a result of the wrong length fails the call's samples, each alone
        bad = RewardPool(f"{plugin}:short", workers=0)
        assert bad(["a", "b"], ["a", "b"]) == [{"overall": 1.0}, {"overall": 1.0}]  # one per call: length 1 is right
    finally:
        pool.close()
    # in-process (no timeout possible): exceptions still score 0 per sample
    local = RewardPool(f"{plugin}:flaky", workers=0)
    assert local(["red", "boom"], ["red", "red"]) == [{"overall": 1.0, "accuracy": 1.0}, FAILED]
    assert local.failures == 1
    # a call where everything fails: every sample id logged (the log file gets DEBUG), the console the first 8 + a count
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="megatron_papo")
    assert local(["boom"] * 10, ["x"] * 10, ids=[f"s{k}" for k in range(10)]) == [FAILED] * 10
    per_sample = [r for r in caplog.records if "failed for sample" in r.getMessage()]
    assert [r.getMessage().split("sample ")[1].split(" ")[0] for r in per_sample] == [f"s{k}" for k in range(10)]
    assert [r.levelno for r in per_sample] == [logging.WARNING] * 8 + [logging.DEBUG] * 2
    assert any("10 of 10 samples of this call failed" in r.getMessage() for r in caplog.records)


_PARENT = """
import sys, time
from megatron_papo.rewards.pool import RewardPool
pool = RewardPool(sys.argv[1], workers=2, timeout_s=600)
pool._ensure_workers()
print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
pool(["hang", "hang"], ["a", "a"])  # both workers busy in user code when the parent is killed
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_workers_die_with_a_killed_parent(plugin):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PARENT, f"{plugin}:flaky"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        time.sleep(1.0)  # the hanging call is under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_plugin_config_errors_are_one_line(plugin, tmp_path):
    with pytest.raises(ConfigError, match=r"no file .*missing\.py"):
        RewardPool(f"{tmp_path}/missing.py:fn", workers=0)
    with pytest.raises(ConfigError, match="has no function 'nope'; it defines: exact, flaky, short, weighted"):
        RewardPool(f"{plugin}:nope", workers=0)
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="importing .*broken.py failed: ModuleNotFoundError"):
        RewardPool(f"{broken}:fn", workers=0)
    with pytest.raises(ConfigError, match="unknown reward function 'gsm8k'; known: math, synthetic"):
        RewardPool("gsm8k", workers=0)
    with pytest.raises(ConfigError, match="expected path/to/file.py:function_name"):
        load_config(None, ["data.reward=x.py:1bad"])
    with pytest.raises(ConfigError, match="data.reward_timeout_s"):
        load_config(None, ["data.reward_timeout_s=0"])
