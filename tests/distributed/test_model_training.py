"""The mcore Qwen2.5-VL trains identically at TP=1, TP=2 and PP=2 (tied embeddings) under mcore DDP + Adam + schedule."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = "tests.distributed.model_workers:train_steps"


def _summary(results: list[dict]) -> tuple[list[float], list[float]]:
    losses = [r["losses"] for r in results if r["last_stage"]][0]
    return [step[0] for step in losses], results[0]["grad_norms"]


def test_two_adam_steps_match_across_layouts(tiny_model_dir):
    ref_losses, ref_norms = _summary(run_distributed(WORKER, 1, {"hf_dir": str(tiny_model_dir), "tp": 1, "pp": 1}))
    assert ref_losses[1] < ref_losses[0]
    for tp, pp in ((2, 1), (1, 2)):
        losses, norms = _summary(run_distributed(WORKER, 2, {"hf_dir": str(tiny_model_dir), "tp": tp, "pp": pp}))
        assert losses == pytest.approx(ref_losses, abs=1e-5), (tp, pp)
        assert norms == pytest.approx(ref_norms, abs=1e-5), (tp, pp)
