"""wandb (offline) and mlflow (local file store) trackers behind ``logging.backends``: what they recorded is read
back from their files (wandb's datastore records, mlflow's file-store layout) — the config, the run dir, every step's
numbers — and a resumed writer continues the same tracker runs while a fresh start opens new ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_papo.config import ConfigError, load_config, to_dict
from megatron_papo.utils.metrics import MetricsWriter
from tests.wandb_records import offline_runs

STEPS = {1: {"reward/mean": 0.25, "optim/lr": 1e-4, "eval/geo3k@k/accuracy": 0.5},
         2: {"reward/mean": 0.5, "optim/lr": 2e-4, "note": "text is skipped", "nan": float("nan")},
         3: {"reward/mean": 0.75, "optim/lr": 1.5e-4}}


def _writer(run_dir: Path, overrides: list[str], resume_step=None) -> MetricsWriter:
    cfg = load_config(None, [f"run_dir={run_dir}", "logging.backends=jsonl,wandb,mlflow", *overrides])
    return MetricsWriter.from_config(cfg, enabled=True, resume_step=resume_step)


def _mlflow_run(run_dir: Path, run_id: str) -> Path:
    (found,) = [p for p in (run_dir / "mlruns").glob(f"*/{run_id}") if p.is_dir()]
    return found


def _mlflow_metric(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [ln.split() for ln in (run / "metrics" / key).read_text().splitlines()]
    return [(int(step), float(value)) for _ts, value, step in rows]


def test_wandb_offline_and_mlflow_file_store_record_config_metrics_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    w = _writer(run_dir, ["optim.lr=2e-4", "total_steps=2"])
    for s in (1, 2):
        w.write(s, STEPS[s])
    w.close()
    ids = json.loads((run_dir / "trackers.json").read_text())
    # resume after the step-2 checkpoint with a longer run: the same tracker runs continue
    w = _writer(run_dir, ["optim.lr=2e-4", "total_steps=3"], resume_step=2)
    w.write(3, STEPS[3])
    w.close()
    assert json.loads((run_dir / "trackers.json").read_text()) == ids

    # ---- wandb: two offline segments of one run id; config with the absolute run dir; every finite number
    first, second = offline_runs(run_dir)
    assert first["run_id"] == second["run_id"] == ids["wandb"]["id"]
    assert first["project"] == "megatron_papo"
    assert first["config"]["run_dir"] == str(run_dir.resolve())
    assert first["config"]["optim"]["lr"] == 2e-4 and first["config"]["total_steps"] == 2
    assert second["config"]["total_steps"] == 3
    hist = {row["_step"]: row for seg in (first, second) for row in seg["history"]}
    assert sorted(hist) == [1, 2, 3]
    for s, vals in STEPS.items():
        want = {k: v for k, v in vals.items() if isinstance(v, float) and v == v}
        assert {k: hist[s][k] for k in want} == want
        assert "note" not in hist[s] and "nan" not in hist[s]

    # ---- mlflow: one run in the file store, reopened and finished again; params = flattened resolved config
    run = _mlflow_run(run_dir, ids["mlflow"]["run_id"])
    assert (run / "tags" / "run_dir").read_text() == str(run_dir.resolve())
    assert (run / "params" / "optim.lr").read_text() == "0.0002"
    assert (run / "params" / "logging.backends").read_text() == "['jsonl', 'wandb', 'mlflow']"
    assert _mlflow_metric(run, "reward/mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert _mlflow_metric(run, "optim/lr") == [(1, 1e-4), (2, 2e-4), (3, 1.5e-4)]
    assert _mlflow_metric(run, "eval/geo3k_k/accuracy") == [(1, 0.5)]  # '@' is not a valid mlflow key char
    assert not (run / "metrics" / "note").exists() and not (run / "metrics" / "nan").exists()
    assert "status: 3" in (run / "meta.yaml").read_text()  # RunStatus.FINISHED
    saved = json.loads((run / "artifacts" / "config.json").read_text())
    assert saved["total_steps"] == 2 and saved["run_dir"] == str(run_dir.resolve())
    assert json.loads((run / "artifacts" / "config_step2.json").read_text())["total_steps"] == 3  # changed on resume
    # the jsonl sink wrote the same records
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["note"] == "text is skipped"

    # ---- a fresh start (no checkpoint to resume) opens new tracker runs
    w = _writer(run_dir, ["optim.lr=2e-4", "total_steps=3"])
    w.close()
    new = json.loads((run_dir / "trackers.json").read_text())
    assert new["wandb"]["id"] != ids["wandb"]["id"] and new["mlflow"]["run_id"] != ids["mlflow"]["run_id"]


def test_backends_config_errors():
    assert load_config(None).logging.backends == ["jsonl", "tensorboard"]
    with pytest.raises(ConfigError, match=r"unknown backend\(s\) \['neptune'\]"):
        load_config(None, ["logging.backends=jsonl,neptune"])
    with pytest.raises(ConfigError, match="names a backend twice"):
        load_config(None, ["logging.backends=jsonl,jsonl"])
    assert to_dict(load_config(None, ["logging.backends=[wandb]"]))["logging"]["backends"] == ["wandb"]


def test_missing_tracker_package_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"includes mlflow but the 'mlflow' package is not installed; pip install"):
        load_config(None, ["logging.backends=jsonl,mlflow"])
