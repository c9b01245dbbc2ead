"""Non-finite guard (parallel/training.py ``guarded_step``) with mcore's plain and distributed optimizers."""

from __future__ import annotations

import math

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("distopt", [False, True])
def test_one_rank_nonfinite_skips_everywhere_clean_step_equals_mcore(distopt):
    res = run_distributed("tests.distributed.guard_workers:guarded_step_agrees", 2, {"distopt": distopt})
    for r in res:
        assert r["nan_grads_updated"] is False and r["unchanged_after_nan_grads"], r  # fp32: mcore itself would not skip
        assert r["nan_loss_updated"] is False and r["unchanged_after_nan_loss"], r
        assert r["clean_updated"] is True and r["clean_moved"] and r["clean_equals_mcore_step"], r
        assert math.isfinite(r["clean_norm"]) and r["clean_norm"] > 0
