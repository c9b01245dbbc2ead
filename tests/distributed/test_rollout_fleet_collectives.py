"""The fleet's one collective (gather of per-engine blocks, or error strings) on 2 gloo ranks: global order
independent of which engine answers first, hand-derived block split, and one engine's failure raising the same
FleetError on every rank (naming engine, owner rank and pid) instead of a hang."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def test_blocks_are_gathered_in_prompt_order_on_every_rank():
    res = run_distributed("tests.distributed.fleet_workers:gather_in_order", nproc=2,
                          kwargs={"items": 10, "engines_per_rank": 2}, timeout=120)
    # 4 engines over 10 prompts: engine floor(i*4/10) = 0,0,0,1,1,2,2,2,3,3 (engines 0,1 on rank 0; 2,3 on rank 1)
    want_engine = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    for r in res:  # each row: [engine index seen by the fleet, engine that answered, prompt, owner pid]
        assert [x[2] for x in r["results"]] == list(range(10))  # prompt order, although engine 0 answered last
        assert [x[0] for x in r["results"]] == want_engine and [x[1] for x in r["results"]] == want_engine
    pid = [r["pid"] for r in res]
    assert [x[3] for x in res[0]["results"]] == [pid[0]] * 5 + [pid[1]] * 5  # each owner ran exactly its engines
    assert res[0]["calls"] == {"0": [[0, 1, 2]], "1": [[3, 4]]} and res[1]["calls"] == {"2": [[5, 6, 7]], "3": [[8, 9]]}
    assert res[0]["results"] == res[1]["results"]


def test_one_dying_engine_fails_every_rank_with_the_same_message():
    res = run_distributed("tests.distributed.fleet_workers:one_engine_dies", nproc=2, kwargs={"die_engine": 1}, timeout=120)
    assert res[0]["error"] is not None and res[0]["error"] == res[1]["error"]
    assert "engine 1 (owner rank 1, host pid" in res[0]["error"] and "EngineDiedError" in res[0]["error"]
    assert all(r["seconds"] < 10 and r["stopped"] for r in res)  # no hang; every rank shut its engines down
