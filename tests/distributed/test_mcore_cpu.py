"""Foundation acceptance: a tiny mcore GPTModel on gloo reproduces TP=1 losses under TP/PP/DP layouts."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

TARGET = "tests.distributed.mcore_gpt_workers:train_gpt"


@pytest.fixture(scope="module")
def reference_losses():
    res = run_distributed(TARGET, 1, {"tp": 1, "pp": 1})
    return res[0]["losses"]


def _losses(results):
    reporters = [r for r in results if r["last"]]
    assert len(reporters) == 1
    return reporters[0]["losses"]


@pytest.mark.parametrize("layout", [
    {"nproc": 2, "tp": 2, "pp": 1},
    {"nproc": 2, "tp": 1, "pp": 2},
    {"nproc": 4, "tp": 2, "pp": 2},
    {"nproc": 2, "tp": 1, "pp": 1, "distopt": True},
    {"nproc": 2, "tp": 2, "pp": 1, "sp": True},
], ids=["tp2", "pp2", "tp2pp2", "dp2_distopt", "tp2_sp"])
def test_layouts_match_tp1(reference_losses, layout):
    layout = dict(layout)
    nproc = layout.pop("nproc")
    losses = _losses(run_distributed(TARGET, nproc, layout))
    assert len(losses) == len(reference_losses) == 5
    assert reference_losses[-1] < reference_losses[0]  # it trains
    for a, b in zip(losses, reference_losses):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (losses, reference_losses)
