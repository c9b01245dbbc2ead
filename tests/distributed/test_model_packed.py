"""Packed sequences (several samples per row, ``segment_ids``) give transformers' per-sample log-probs (TP=2)."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed]


def test_packed_rows_match_transformers(tiny_untied_dir):
    for res in run_distributed("tests.distributed.model_workers:packed_parity", 2,
                               {"hf_dir": str(tiny_untied_dir), "tp": 2}):
        assert res["tokens"] > 100
        assert res["max_abs_logprob_diff"] <= 1e-4, res
