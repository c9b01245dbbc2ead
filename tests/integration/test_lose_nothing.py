"""Lose nothing (issue 15), end to end on the tiny model with live SGLang rollouts.

- A diverging run (lr=1e10): NaN steps are skipped and counted, the run stops after max_skipped_steps with
  exit 3 and one line, and every checkpoint holds finite values (the skipped steps left the weights alone).
- Preemption and resume: SIGTERM saves the last finished step (exit 143, ``latest`` names it); a rerun continues
  there; a SIGKILL mid-run and a truncated file in the newest checkpoint (falls back to the previous one) both
  resume too. The metrics of the whole interrupted sequence equal those of one uninterrupted run of the same
  config bit for bit: fresh runs repeat, and the engine's seeded sampling (rollout/cpu_shim/seeded.py) makes
  live rollouts after a resume repeat as well.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.harness import REPO, dcp_tensors
from tests.integration.test_train_e2e import _cmd, _env, _metrics, _train

pytestmark = [pytest.mark.engine, pytest.mark.slow]

LIVE = ["total_steps=4", "eval_at_end=false", "checkpoint.save_every=2", "checkpoint.keep_last=3"]


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "throughput/"))} for r in rows]


def _start(run: Path, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run, 1, extra), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}:\n{proc.stderr.read()[-4000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _steps(run: Path) -> list[int]:
    """Steps logged so far (complete lines only: the file may be mid-write)."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line)["step"] for line in text.split("\n")[:-1] if line.strip()]


def _latest(run: Path) -> str:
    marker = run / "checkpoints" / "latest"
    return marker.read_text() if marker.is_file() else ""


def test_diverging_run_skips_nan_steps_stops_and_keeps_finite_checkpoints(tmp_path):
    run = tmp_path / "lr1e10"
    extra = ["total_steps=6", "optim.lr=1e10", "optim.max_skipped_steps=2", "checkpoint.save_every=1",
             "checkpoint.keep_last=2", "eval_at_end=false"]
    proc = subprocess.run(_cmd(run, 1, extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 3, proc.stderr[-6000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-papo:")]
    assert len(lines) == 1 and "training stopped" in lines[0] and "2 consecutive steps" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["update/skipped_total"] for r in rows] == [0, 1, 2] and [r["update_skipped"] for r in rows] == [0, 1, 1]
    norms = [float(r["grad_norm"]) for r in rows]  # non-finite values are logged as strings ("nan")
    assert math.isfinite(norms[0]) and not any(math.isfinite(n) for n in norms[1:])
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000001", "step_000002"] and _latest(run) == "step_000002"  # step 3 diverged: not saved
    one, two = (dcp_tensors(run / "checkpoints" / name, tmp_path) for name in ckpts)
    assert one.keys() == two.keys() and len(one) > 30
    assert all(bool(torch.isfinite(t).all()) for t in [*one.values(), *two.values()] if t.is_floating_point())
    weights = [k for k in one if "optimizer" not in k]
    assert weights and all(torch.equal(one[k], two[k]) for k in weights)  # the NaN step did not touch the weights
    assert max(float(one[k].abs().max()) for k in weights) > 1e6  # lr=1e10 really moved them at step 1


@pytest.mark.timeout(2400)  # five engine starts in one test (6.5 min on 2 idle cores; 15 min measured under load)
def test_sigterm_sigkill_and_truncated_checkpoint_resume_like_one_uninterrupted_run(tmp_path):
    full = _train(tmp_path / "full", extra=LIVE)
    assert [r["step"] for r in full] == [1, 2, 3, 4] and full[3]["kl/ref"] > 0

    run = tmp_path / "interrupted"
    # 1) SIGTERM after step 1: the current step is finished, saved, logged; exit 143
    proc = _start(run, LIVE)
    _wait_for(proc, lambda: _steps(run), "the first step")
    os.kill(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143, err[-4000:]
    saved = _steps(run)[-1]
    assert saved in (1, 2) and _latest(run) == f"step_{saved:06d}", (saved, _latest(run))
    assert f"preempted by SIGTERM: saved step {saved}" in err and "Traceback" not in err

    # 2) the same command resumes there; SIGKILL once step 3 is logged (mid step 4, latest = step 2)
    proc = _start(run, LIVE)
    _wait_for(proc, lambda: _steps(run)[-1:] == [3] and _latest(run) == "step_000002", "step 3")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _latest(run) == "step_000002"

    # 3) and again: finishes the run from step 2
    _train(run, extra=LIVE)
    assert _latest(run) == "step_000004"

    # 4) a truncated file in the newest checkpoint and a stale .tmp dir: warn with the path, fall back to step 2
    victim = max((run / "checkpoints" / "step_000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    stale = run / "checkpoints" / ".tmp_step_000009"
    stale.mkdir()
    proc = subprocess.run(_cmd(run, 1, LIVE), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"checkpoint {victim.parent} is unusable: {victim} has {size // 2} bytes" in proc.stderr, proc.stderr[-4000:]
    assert "step_000002 instead" in proc.stderr and not stale.exists()
    assert _latest(run) == "step_000004"

    resumed = _metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert _strip(resumed) == _strip(full)  # fresh steps repeat, resumed live rollouts repeat: bit for bit


def test_train_on_an_empty_or_undecodable_dataset_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run(_cmd(tmp_path / "run", 1, [f"data.train={empty}", "total_steps=1"]), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-papo:")]
    assert lines == [f"megatron-papo: data error: data source '{empty}' has 0 rows (the file is empty); point "
                     "data.train/data.test at a file with rows"], proc.stderr[-3000:]


ASYNC = ["total_steps=3", "eval_at_end=false", "checkpoint.save_every=1", "rollout.placement=separate",
         "rollout.transport=distributed", "rollout.async_steps=1", "algo.rollout_correction=tis"]


@pytest.mark.timeout(1800)
def test_async_tis_run_and_sigkill_resume_like_one_uninterrupted_run(tmp_path):
    """Overlapped rollouts (one separate engine fed through a gloo weight group) with TIS: step 1 is on-policy, steps
    2-3 train on rollouts generated one update earlier while the next ones generate. A SIGKILL during step 2 leaves
    the step-1 checkpoint, which holds step 2's rollouts (generated during step 1, with the data position from before
    their draw); the resumed run repeats the uninterrupted one bit for bit. That needs the engine's log-probs (TIS's
    behaviour policy) to repeat too although generation now overlaps training and its batches form differently:
    the CPU engine computes batch-invariantly (rollout/cpu_shim/batch_invariant.py); without it loss/pg at step 2
    varied in the 7th digit from run to run (0.0037745265, 0.0037745191, 0.0037745284)."""
    full = _train(tmp_path / "full", extra=ASYNC)
    assert [r["step"] for r in full] == [1, 2, 3] and [r["rollout/staleness"] for r in full] == [0.0, 1.0, 1.0]
    assert full[0]["rollout/logprob_gap"] <= 1e-4 and abs(full[0]["rollout_corr/weight_mean"] - 1.0) <= 1e-5
    for r in full[1:]:  # engines one update behind the trainer: the gap measures the staleness, TIS reweights
        assert "rollout/logprob_gap" not in r and r["rollout/logprob_gap_stale"] > 1e-3
        assert r["rollout_corr/weight_mean"] != 1.0 and 0.0 <= r["rollout_corr/corrected_frac"] <= 1.0
    for r in full[:2]:  # steps 1-2 generated the next step's rollouts in the background
        assert 0.0 <= r["timing/overlap"] <= r["timing/generate"] and r["timing/rollout_wait"] >= 0.0
    assert "timing/generate" not in full[2]  # nothing generated ahead of the last step

    run = tmp_path / "killed"
    proc = _start(run, ASYNC)
    _wait_for(proc, lambda: _latest(run) == "step_000001", "the step-1 checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((run / "checkpoints" / "step_000001" / "trainer_state.json").read_text())
    assert state["async_rollouts"]["step"] == 2 and len(json.loads(state["async_rollouts"]["groups"])) == 16
    _train(run, extra=ASYNC)
    assert _strip(_metrics(run)) == _strip(full)
