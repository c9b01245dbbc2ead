"""Async dist-checkpoint saves (megatron-core ``async_sharded_save`` + ``AsyncCallsQueue``, ``checkpoint/dist.py``).

- DP=2 with the distributed optimizer on gloo: the async checkpoint of step 2, written while step 3 trains, holds
  the model tensors of the synchronous checkpoint of step 2 bit for bit, and loads back to each rank's in-memory
  weights, main params and Adam moments of step 2 exactly; ``latest`` appears only when the writes are published.
- While those writes run (scheduled, not finalised: what a process killed mid-write leaves on disk), ``latest`` still
  names the previous (async, published) checkpoint, which is what a resume picks; the ``.tmp_step_*`` directory has
  no manifest and is not resumable.
- An abandoned save (``AsyncSaves.abandon``, ``Trainer.close`` on an error path) is never published.
- The distributed optimizer saves and loads at DP=2 (``OPTIM_METADATA``: mcore 0.16.1's default sharding type
  fails to save), and a resumed Adam keeps its step count.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import dcp_tensors, run_distributed

pytestmark = pytest.mark.distributed
W = "tests.distributed.async_save_workers"


def test_async_save_with_distributed_optimizer_equals_the_sync_save_of_that_step(tmp_path):
    from megatron_papo.checkpoint.dist import validate_checkpoint

    res = run_distributed(f"{W}:async_snapshot_while_training", 2, {"root": str(tmp_path), "distopt": True})
    for r in res:
        assert r["published_1"] == str(tmp_path / "async" / "step_000001")
        # writes of step 2 in flight: the previous checkpoint is 'latest' and what a resume picks
        assert r["latest_while_writing"] == "step_000001" and r["unpublished"]
        assert r["resumable_while_writing"] == str(tmp_path / "async" / "step_000001")
        assert r["latest_after_poll"] == "step_000002"
        # training really moved on while the writers ran: weights, main params and Adam moments all changed
        assert r["changed_by_step3"]["params"] > 1e-4 and r["changed_by_step3"]["optim"] > 1e-4
        # the async checkpoint loads back to this rank's weights and optimizer shard at save time, exactly
        assert r["restored_max_diff"] == {"params": 0.0, "optim": 0.0}
        assert r["state"]["step"] == 2 and r["state"]["loader"] == {"pos": 2}
        assert r["after_abandon"] == {"latest": "step_000002", "pending": None, "published": False}
    ckpt = tmp_path / "async" / "step_000002"
    assert validate_checkpoint(ckpt) is None and (ckpt / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "async").glob(".tmp_*")] == [".tmp_step_000003"]  # the abandoned one only
    got = dcp_tensors(ckpt, tmp_path)
    want = dcp_tensors(tmp_path / "sync" / "step_000002", tmp_path)
    assert sorted(got) == sorted(want)
    optim = [k for k in want if "optimizer" in k]
    assert {k.rsplit(".", 1)[1] for k in optim} == {"param", "exp_avg", "exp_avg_sq"}  # the distopt shards are in it
    model = [k for k in want if "optimizer" not in k]
    assert len(model) >= 9
    for k in model:  # (the optimizer buckets hold uninitialised padding, so they are compared after loading above)
        assert torch.equal(got[k], want[k]), k
