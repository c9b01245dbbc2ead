"""tools/compare_logprobs.py: one JSON line under torchrun; exit status follows --atol."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO, run_torchrun

pytestmark = [pytest.mark.distributed]
TOOL = str(REPO / "tools" / "compare_logprobs.py")


def _json_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_tool_tp2_prints_one_json_line(tiny_untied_dir, tmp_path):
    run_torchrun([TOOL, "--tp", "2", "--hf", str(tiny_untied_dir), "--out", str(tmp_path / "r.json")], 2)
    out = _json_line((tmp_path / "r.json").read_text())
    assert out["tp"] == 2 and out["pp"] == 1 and out["tokens"] > 100
    assert out["max_abs_logprob_diff"] <= 1e-4


def test_tool_exits_nonzero_above_atol(tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, TOOL, "--hf", str(tiny_model_dir), "--atol", "0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _json_line(proc.stdout)["max_abs_logprob_diff"] > 0
