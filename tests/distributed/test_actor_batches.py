"""The actor's micro-batches run the vision tower once per prompt and give the same logits as per-row images."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def test_group_image_dedupe_is_exact(tiny_model_dir):
    (res,) = run_distributed("tests.distributed.actor_workers:dedupe_equals_naive", 1, {"hf_dir": str(tiny_model_dir)})
    assert res["distinct_images"] == 2 and res["slots"] == [0, 0, 0, 1, 1, 1]
    assert res["scale"] > 0.1 and res["max_diff"] <= 1e-6
