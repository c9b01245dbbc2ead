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


def test_weight_sync_agreement_gathers_messages_only_when_a_rank_failed():
    res = run_distributed("tests.distributed.fleet_workers:agree_on_errors", nproc=2, kwargs={"error_rank": 1}, timeout=120)
    assert [r["clean_gathers"] for r in res] == [0, 0]  # no error anywhere: the all-reduce alone decides
    assert res[0]["error"] == res[1]["error"] and "weight sync failed on 1 engine(s)" in res[0]["error"]
    assert "engine 1 (owner rank 1): boom" in res[0]["error"]
    assert [r["gathers"] for r in res] == [1, 1] and all(r["stopped"] for r in res)


def test_a_failed_memory_release_or_resume_fails_every_rank_alike():
    res = run_distributed("tests.distributed.fleet_workers:memory_call_fails_on_one_rank", nproc=2, kwargs={"fail_rank": 1},
                          timeout=120)
    for what, call in (("release", "release_memory"), ("resume", "resume_memory")):
        errs = [r[what]["error"] for r in res]
        assert errs[0] is not None and errs[0] == errs[1], (what, errs)
        assert f"{call} failed on 1 engine(s)" in errs[0] and "engine 1 (owner rank 1, host pid" in errs[0]
        assert all(r[what]["seconds"] < 10 and r[what]["stopped"] for r in res)


def test_async_rollouts_overlap_main_thread_collectives_and_gather_at_collect():
    """Both ranks' engines generate in a background thread while the main threads run all-reduces; every collective
    (the all-reduces and the fleet's gather) is issued by the main thread; collect gives the same groups, in prompt
    order, on both ranks. A second round whose engine 1 dies in the background fails every rank alike at collect."""
    res = run_distributed("tests.distributed.fleet_workers:async_overlap", nproc=2, kwargs={"delay": 1.0, "die_engine": 1},
                          timeout=120)
    for r in (x["ok"] for x in res):
        assert r["threads"] == ["MainThread"], r["threads"]
        assert r["engine_threads"] == ["rollout-step2"] and r["submit_s"] < 0.5
        assert r["stats"]["timing/overlap"] >= 0.9 and r["stats"]["timing/generate"] >= 1.0
    want = [[u, i // 3, [[u, k, i // 3] for k in range(2)]] for i, u in enumerate(range(10, 16))]  # rank r's engine r
    assert res[0]["ok"]["groups"] == want and res[1]["ok"]["groups"] == want
    failed = [x["failed"] for x in res]
    assert failed[0]["error"] == failed[1]["error"] and "engine 1 (owner rank 1, host pid" in failed[0]["error"]
    assert all(f["threads"] == ["MainThread"] for f in failed)
