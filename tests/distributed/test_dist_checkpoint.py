"""Foundation acceptance: a dist-checkpoint saved at TP=2 loads at TP=1 and at PP=2 with identical logits."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed
W = "tests.distributed.mcore_gpt_workers:save_then_logits"


def _logits(results):
    got = [r["logits"] for r in results if r["logits"] is not None]
    return torch.tensor(got[0])


def test_tp2_save_loads_at_tp1_and_pp2(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = _logits(run_distributed(W, 2, {"tp": 2, "ckpt": ckpt, "mode": "save"}))
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000003"
    tp1 = _logits(run_distributed(W, 1, {"tp": 1, "ckpt": ckpt, "mode": "load"}))
    pp2 = _logits(run_distributed(W, 2, {"pp": 2, "ckpt": ckpt, "mode": "load"}))
    assert saved.abs().max() > 0.1
    torch.testing.assert_close(tp1, saved, rtol=0, atol=1e-5)
    torch.testing.assert_close(pp2, saved, rtol=0, atol=1e-5)
