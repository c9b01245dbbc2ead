"""Acceptance: an mcore TP=2 actor with different weights syncs into the SGLang engine (CPU); afterwards the
engine's greedy tokens equal transformers' holding those weights, and its log-probs match the actor's
and transformers' within 1e-5 (tools/check_weight_sync.py under torchrun)."""

from __future__ import annotations

import json

import pytest

from tests.harness import REPO, run_torchrun

pytestmark = [pytest.mark.engine, pytest.mark.distributed, pytest.mark.slow]


def test_tp2_actor_sync_into_sglang(tmp_path):
    out = tmp_path / "result.json"
    run_torchrun([str(REPO / "tools" / "check_weight_sync.py"), "--tp", "2", "--transport", "distributed",
                  "--bucket-mb", "1", "--check-transformers", "--out", str(out)], nproc=2, timeout=1200)
    res = json.loads(out.read_text())
    print(res)
    assert res["tp"] == 2 and res["engine"] == "sglang" and res["tokens"] > 0
    assert res["max_abs_logprob_diff"] < 1e-5, res
    assert res["greedy_equal_transformers"] is True, res
    assert res["max_abs_logprob_diff_transformers"] < 1e-5, res
