"""``megatron-papo eval``: avg@k on the synthetic test split through the real SGLang engine (one engine start),
checked against an independent recount of the grading from the engine's own per-sample answers; bad paths and
schemas exit 2 with one line, before any engine starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO

EVAL = [sys.executable, "-m", "megatron_papo.cli", "eval"]
SMALL = ["--n", "2", "--max-new-tokens", "3", "--reward", "synthetic", "--format-prompt", "short_answer",
         "data.synthetic_test_size=16"]


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*EVAL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.engine
def test_eval_prints_table_and_json(tiny_model_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = _run(["--model", str(tiny_model_dir), "--data", "synthetic", "--out", str(out), *SMALL])
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "| benchmark | avg@2 accuracy | format | majority baseline | questions |"
    assert lines[1] == "|---|---|---|---|---|"
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    printed = json.loads(lines[3])
    saved = json.loads(out.read_text())
    assert printed == saved and list(saved) == ["synthetic"]
    r = saved["synthetic"]
    assert r["questions"] == 16 and r["n"] == 2
    assert 0.0 <= r["accuracy"] <= r["format"] <= 1.0  # a correct answer is always in format
    # the majority baseline of the synthetic test split, recounted from the dataset itself
    from transformers import AutoProcessor

    from megatron_papo.config import load_config
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.evaluate import majority_baseline

    cfg = load_config(None, ["data.format_prompt=short_answer", "data.reward=synthetic", "data.synthetic_test_size=16"])
    ds = load_prompt_dataset("synthetic", cfg.data, AutoProcessor.from_pretrained(str(tiny_model_dir)), "test")
    answers = [ds.encode(i).answer for i in range(len(ds))]
    assert r["majority_baseline"] == pytest.approx(majority_baseline(answers))
    assert 0.25 <= r["majority_baseline"] < 0.5  # 4 balanced classes over 16 rows
    assert row == ["synthetic", f"{100 * r['accuracy']:.2f}", f"{100 * r['format']:.2f}",
                   f"{100 * r['majority_baseline']:.2f}", "16"]


def _one_line(rc: int, stderr: str, needle: str) -> None:
    err = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert err and err[-1].startswith("megatron-papo: config error:") and needle in err[-1], stderr[-3000:]


def _main(args: list[str], capsys) -> tuple[int, str]:
    """``megatron-papo eval`` in this process (these errors come before any engine or process group starts)."""
    from megatron_papo.cli import main

    rc = main(["eval", *args])
    return rc, capsys.readouterr().err


def test_eval_bad_model_path(tmp_path, capsys):
    _one_line(*_main(["--model", str(tmp_path / "nope"), "--data", "synthetic", *SMALL], capsys), "no config.json")


def test_eval_bad_data_path_and_schema(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bench.jsonl"
    bad.write_text(json.dumps({"question": "What colour?", "answer": "red"}) + "\n")
    _one_line(*_main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"), *SMALL], capsys),
              "does not exist")
    _one_line(*_main(["--model", str(tiny_model_dir), "--data", "synthetic", str(bad), *SMALL], capsys),
              "no column 'problem'")


def test_eval_subcommand_takes_options_first():
    """``megatron-papo eval --model X`` reaches evaluate.py (argparse.REMAINDER used to reject a leading option)."""
    proc = _run(["--help"], timeout=300)
    assert proc.returncode == 0 and "--model" in proc.stdout and "avg@k" in proc.stdout
