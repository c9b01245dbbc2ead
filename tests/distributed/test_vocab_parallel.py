"""``token_stats`` under torchrun/gloo at TP=1, 2 and 4 against the float64 single-process reference.

One 4-rank job builds explicit groups for TP=4 (world), TP=2 ({0,1}, {2,3}) and TP=1 (singletons;
odd ranks pass ``group=None``) and runs every case at each size; one 2-rank job covers TP=2 on the
default group. Each rank slices its vocab shard from the seeded full logits and returns outputs and
gradient shards; the shards are glued here and compared with ``error_ratios`` (see its tolerances).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.vocab_parallel_workers import CASES, CHUNK_PAIRS, OUTPUTS, assemble, error_ratios
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed
TARGET = "tests.distributed.vocab_parallel_workers:check_tp"


def _check(per_rank: list, tps: list[int]) -> dict:
    worst: dict[str, float] = {}
    for tp in tps:
        for name, case in CASES.items():
            for got in assemble(per_rank, tp, name):
                for r, meta in got["meta"].items():
                    assert meta["returned"] == sorted(case.outputs), (tp, name, r)
                    assert meta["dtypes"] == ["torch.float32"] and meta["inputs_unchanged"], (tp, name, r)
                    assert meta["ref_out_requires_grad"] == (case.ref_grad and any(k.startswith("ref_") for k in case.outputs))
                for r, outs in enumerate(got["outputs_by_rank"]):  # every rank of a group returns the same values
                    for k in case.outputs:
                        assert torch.equal(outs[k], got["outputs_by_rank"][0][k]), (tp, name, r, k)
                has_ref_grad = case.ref_grad and any(k.startswith("ref_") or k == "kl" for k in case.outputs)
                assert (got["grad_xr"] is not None) == has_ref_grad, (tp, name)
                ratios = error_ratios(name, got)
                for k, v in ratios.items():
                    worst[f"tp{tp}/{name}/{k}"] = v
                assert all(v <= 1.0 for v in ratios.values()), (tp, name, ratios)
                assert all(torch.isfinite(got[k]).all() for k in (*case.outputs, "grad_x")), (tp, name)
            if name in dict(CHUNK_PAIRS):
                whole = assemble(per_rank, tp, name)[0]
                chunked = assemble(per_rank, tp, dict(CHUNK_PAIRS)[name])[0]
                for k in (*case.outputs, "grad_x", "grad_xr"):
                    diff = float(((whole[k] - chunked[k]).abs() / chunked[k].abs().clamp_min(1.0)).max())
                    assert diff <= 1e-7, (tp, name, k, diff)
    return worst


def test_tp1_tp2_tp4_explicit_groups():
    per_rank = run_distributed(TARGET, nproc=4, kwargs={"cases": list(CASES), "tps": [1, 2, 4]})
    worst = _check(per_rank, [1, 2, 4])
    print("worst error/tolerance:", max(worst.values()), max(worst, key=worst.get))


def test_tp2_default_group():
    per_rank = run_distributed(TARGET, nproc=2, kwargs={"cases": list(CASES), "tps": [2]})
    _check(per_rank, [2])
    got = assemble(per_rank, 2, "bs")[0]
    assert got["logprob"].shape == (3, 5) and got["grad_x"].shape == (3, 5, 48)
    assert set(OUTPUTS) == set(CASES["bs"].outputs)
