"""One short run, then its resume, with every experiment-ergonomics knob on: all four metric backends (wandb
offline, mlflow file store), a warmup + cosine LR schedule, two validation benchmarks every step, and a reward
plugin that raises on some prompts. Checks: the lr of each step against the closed form (the resumed step too),
the same tracker runs continued and holding the same numbers as metrics.jsonl, eval/<name>/accuracy with macro
average and best step across the resume, failed rewards scored 0 and counted exactly per step, and a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import REPO
from tests.unit.test_lr_schedule import expected_lr
from tests.wandb_records import offline_runs

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PLUGIN = textwrap.dedent('''
    from megatron_papo.rewards.synthetic import synthetic_reward

    def score(responses, answers, format_weight=0.1):
        if "red" in answers:
            raise RuntimeError("this grader cannot handle red")
        return synthetic_reward(responses, answers, format_weight=format_weight)
''')
LR, MIN_LR, WARMUP, DECAY = 3e-4, 1e-5, 2, 4


def _train(run_dir: Path, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "megatron_papo.cli", "train", "--config", "tiny_cpu", f"run_dir={run_dir}",
           "data.synthetic_train_size=64", "data.synthetic_test_size=16", "eval_n=1", "logging.progress=false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]


def _mlflow_metric(run: Path, key: str) -> dict[int, float]:
    rows = [ln.split() for ln in (run / "metrics" / key).read_text().splitlines()]
    return {int(step): float(value) for _ts, value, step in rows}


def test_trackers_lr_schedule_benchmarks_and_reward_plugin_across_a_resume(tmp_path):
    from megatron_papo.data.synthetic import write_synthetic

    bench = write_synthetic(tmp_path / "bench", n_train=4, n_test=8, seed=5)["test"]  # PAPO_eval parquet schema
    plugin = tmp_path / "grader.py"
    plugin.write_text(PLUGIN)
    run = tmp_path / "run"
    common = ["logging.backends=jsonl,tensorboard,wandb,mlflow", f"optim.lr={LR}", f"optim.lr_warmup_steps={WARMUP}",
              "optim.lr_decay=cosine", f"optim.lr_decay_steps={DECAY}", f"optim.min_lr={MIN_LR}", "eval_every=1",
              "eval_at_end=false", f"eval_datasets=syn=synthetic,geo={bench}", f"data.reward={plugin}:score",
              "data.reward_workers=2", "checkpoint.save_every=1"]
    _train(run, ["total_steps=2", *common])
    ids = json.loads((run / "trackers.json").read_text())
    _train(run, ["total_steps=3", *common])  # resume=auto from the step-2 checkpoint
    assert json.loads((run / "trackers.json").read_text()) == ids

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "reward/mean" in r}
    evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
    assert sorted(train) == sorted(evals) == [1, 2, 3]

    # ---- LR: warmup lr*s/2, then cosine to min_lr at step 4; step 3 is the resumed run's first step
    for s in (1, 2, 3):
        assert train[s]["optim/lr"] == pytest.approx(expected_lr(s, LR, MIN_LR, WARMUP, DECAY, "cosine"), rel=1e-12)
    for s in (2, 3):
        state = json.loads((run / "checkpoints" / f"step_{s:06d}" / "trainer_state.json").read_text())
        assert state["lr_scheduler"]["num_steps"] == s and state["lr_scheduler"]["lr_decay_style"] == "cosine"

    # ---- validation: per benchmark, macro average, best so far (carried over the resume)
    best = (-1.0, 0)
    for s, r in sorted(evals.items()):
        assert r["eval/syn/questions"] == 16 and r["eval/geo/questions"] == 8
        assert r["eval/accuracy"] == pytest.approx((r["eval/syn/accuracy"] + r["eval/geo/accuracy"]) / 2, abs=1e-12)
        if r["eval/accuracy"] > best[0]:
            best = (r["eval/accuracy"], s)
        assert (r["eval/best_accuracy"], r["eval/best_step"]) == best

    # ---- reward plugin: every sample of a prompt whose answer is red scored 0 and counted, the run went on
    from transformers import AutoProcessor

    from megatron_papo.config import load_config
    from megatron_papo.data.dataset import PromptLoader, load_prompt_dataset

    cfg = load_config("tiny_cpu", ["data.synthetic_train_size=64"])
    ds = load_prompt_dataset("synthetic", cfg.data, AutoProcessor.from_pretrained(str(run / "tiny_model")), "train")
    loader = PromptLoader(ds, batch_size=cfg.optim.rollout_batch_size, seed=cfg.data.seed)
    reds = [sum(s.answer == "red" for s in loader.next_batch()) for _ in range(3)]
    assert [train[s]["reward/failed"] for s in (1, 2, 3)] == [8.0 * k for k in reds] and sum(reds) > 0
    log = (run / "logs" / "rank0.log").read_text()
    assert "failed for sample step3/uid" in log and "RuntimeError: this grader cannot handle red" in log

    # ---- trackers: the same runs continued, with the numbers of metrics.jsonl
    segments = offline_runs(run)
    assert len(segments) == 2 and {seg["run_id"] for seg in segments} == {ids["wandb"]["id"]}
    assert segments[0]["config"]["run_dir"] == str(run.resolve()) and segments[1]["config"]["total_steps"] == 3
    hist: dict[int, dict] = {}
    for seg in segments:
        for h in seg["history"]:
            hist.setdefault(h["_step"], {}).update(h)
    mlruns = [p for p in (run / "mlruns").glob(f"*/{ids['mlflow']['run_id']}") if p.is_dir()]
    assert len(mlruns) == 1
    for key in ("optim/lr", "reward/mean", "eval/geo/accuracy", "eval/best_accuracy"):
        want = {s: r[key] for s, r in (evals if key.startswith("eval/") else train).items()}
        assert {s: hist[s][key] for s in want} == want, key
        assert _mlflow_metric(mlruns[0], key) == want, key
    assert (mlruns[0] / "params" / "optim.lr_decay").read_text() == "cosine"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # ---- the run report renders from this run
    from megatron_papo.report import write_report

    paths = write_report([run], tmp_path / "report")
    assert {"reward", "kl_prcp", "entropy", "logprob_gap", "lr", "eval", "timing", "report"} <= set(paths)
    assert "\n| run | 3 |" in paths["report"].read_text()
