"""Workers for test_rollout_fleet_collectives.py: the fleet's gather and error agreement over gloo ranks.

The engines here are recorders (they answer with their own index and the prompts they were given, or die on
request) so that ordering and error propagation can be checked without SGLang; the real-engine acceptance
runs are tests/integration/test_rollout_fleet.py."""

from __future__ import annotations

import os
import time
from typing import Any

import torch.distributed as dist

from megatron_papo.rollout.base import EngineDiedError
from megatron_papo.rollout.fleet import EngineSlot, FleetError, RolloutFleet


class RecordingEngine:
    """Answers each prompt with (its engine index, the prompt, this process's pid); dies when told to."""

    def __init__(self, index: int, die: bool = False, delay: float = 0.0) -> None:
        self.index, self.die, self.delay = index, die, delay
        self.host_pid = os.getpid()
        self.calls: list[list[Any]] = []
        self.stopped = False

    def run(self, block: list[Any]) -> list[Any]:
        time.sleep(self.delay)
        self.calls.append(block)
        if self.die:
            raise EngineDiedError("SGLang engine died during generate (host exit code -9)")
        return [(self.index, p, os.getpid()) for p in block]

    def shutdown(self) -> None:
        self.stopped = True


def _fleet(engines_per_rank: int, die_engine: int = -1, delay_engine: int = -1) -> tuple[RolloutFleet, dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    n = world * engines_per_rank
    slots = [EngineSlot(k, k // engines_per_rank) for k in range(n)]
    mine = {s.index: RecordingEngine(s.index, die=s.index == die_engine, delay=2.0 if s.index == delay_engine else 0.0)
            for s in slots if s.owner == rank}
    return RolloutFleet(slots, rank, world, mine), mine


def gather_in_order(items: int, engines_per_rank: int) -> dict:
    """Every rank gets every item, in order, tagged with the engine (and owner pid) that produced it."""
    fleet, mine = _fleet(engines_per_rank, delay_engine=0)  # engine 0 answers last: order must not depend on timing
    out = fleet.map_blocks(list(range(items)), lambda eng, block: eng.run(block))
    return {"results": [[k, *r] for k, r in out], "calls": {k: e.calls for k, e in mine.items()}, "pid": os.getpid()}


def one_engine_dies(die_engine: int) -> dict:
    """The owner of a dying engine sends an error payload; every rank raises the same FleetError, none hangs."""
    fleet, mine = _fleet(1, die_engine=die_engine)
    t0 = time.perf_counter()
    try:
        fleet.map_blocks(list(range(8)), lambda eng, block: eng.run(block))
    except FleetError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0, "stopped": all(e.stopped for e in mine.values())}
    return {"error": None}


def agree_on_errors(error_rank: int) -> dict:
    """``_agree`` (the end of every weight sync): without errors one all-reduce and no object gather; with an error on
    ``error_rank`` only, every rank raises the same FleetError carrying that rank's message."""
    fleet, mine = _fleet(1)
    real, gathers = dist.all_gather_object, []

    def counting(*a: Any, **kw: Any) -> Any:
        gathers.append(1)
        return real(*a, **kw)

    dist.all_gather_object = counting
    try:
        fleet._agree([], "weight sync")
        clean = len(gathers)
        errors = [f"engine {dist.get_rank()} (owner rank {dist.get_rank()}): boom"] if dist.get_rank() == error_rank else []
        try:
            fleet._agree(errors, "weight sync")
            return {"clean_gathers": clean, "error": None}
        except FleetError as e:
            return {"clean_gathers": clean, "error": str(e), "gathers": len(gathers) - clean,
                    "stopped": all(x.stopped for x in mine.values())}
    finally:
        dist.all_gather_object = real


class MemoryEngine(RecordingEngine):
    """A colocated GPU engine's memory calls, failing on request (the fleet's release/resume, without a GPU)."""

    def __init__(self, index: int, fail: bool) -> None:
        super().__init__(index)
        self.fail = fail

    def release_memory(self) -> None:
        if self.fail:
            raise EngineDiedError("SGLang engine died during release (host exit code -9)")

    def resume_memory(self) -> None:
        if self.fail:
            raise EngineDiedError("SGLang engine died during resume (host exit code -9)")


def memory_call_fails_on_one_rank(fail_rank: int) -> dict:
    """A colocated fleet (``device_type="cuda"`` so that release/resume act; gloo underneath) whose engine on
    ``fail_rank`` fails to release, then (a fresh fleet) to resume: every rank raises the same FleetError; none waits
    in a collective the failing rank never enters."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {}
    for what in ("release", "resume"):
        slots = [EngineSlot(k, k) for k in range(world)]
        mine = {rank: MemoryEngine(rank, fail=rank == fail_rank)}
        fleet = RolloutFleet(slots, rank, world, mine, placement="colocated", device_type="cuda")
        if what == "resume":
            fleet._released = True
        t0 = time.perf_counter()
        try:
            getattr(fleet, what)()
            out[what] = {"error": None}
        except FleetError as e:
            out[what] = {"error": str(e), "seconds": time.perf_counter() - t0, "stopped": mine[rank].stopped}
    dist.barrier()  # both ranks are still in step after the two failures
    return out


class GeneratingEngine:
    """The engine protocol's ``generate``: sample k of prompt uid is ``[uid, k, owner rank]`` after ``delay`` s."""

    def __init__(self, delay: float, die: bool = False) -> None:
        self.delay, self.die = delay, die
        self.host_pid = os.getpid()
        self.threads: list[str] = []

    def generate(self, requests, n=1, sampling=None, seeds=None):
        import threading

        from megatron_papo.rollout.base import GenerationResult

        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        if self.die:
            raise EngineDiedError("SGLang engine died during generate (host exit code -9)")
        return [[GenerationResult([int(p.split()[-1]), k, dist.get_rank()], [-0.5, -1.0, -2.0], "stop") for k in range(n)]
                for p, _ in requests]

    def shutdown(self) -> None:
        pass


def _async_round(delay: float, die_engine: int, seen: list[str]) -> dict:
    from types import SimpleNamespace

    import torch

    from megatron_papo.rollout.async_rollout import AsyncRollout

    seen.clear()
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = GeneratingEngine(delay, die=rank == die_engine)
    fleet = RolloutFleet([EngineSlot(k, k) for k in range(world)], rank, world, {rank: engine}, placement="separate")
    samples = [SimpleNamespace(uid=u, prompt=f"p {u}", images=[], answer="0") for u in (10, 11, 12, 13, 14, 15)]
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))
    ahead = AsyncRollout(fleet)
    t0 = time.perf_counter()
    ahead.submit(2, samples, n=2, sampling={}, seed=1, tokenizer=tok,
                 reward_fn=lambda rs, ans: [{"overall": 0.0} for _ in rs])
    submit_s = time.perf_counter() - t0
    for _ in range(10):  # the main thread's collectives, concurrent with the engines' work
        x = torch.ones(1) * rank
        dist.all_reduce(x)
        time.sleep(delay / 10)
    try:
        groups, stats = ahead.collect(data_cfg=None, processor=None, make_aug=False)
    except FleetError as e:
        return {"error": str(e), "threads": sorted(set(seen))}
    return {"submit_s": submit_s, "stats": stats, "threads": sorted(set(seen)), "engine_threads": engine.threads,
            "groups": [[g.sample.uid, g.engine, g.response_ids] for g in groups]}


def async_overlap(delay: float, die_engine: int) -> dict:
    """Two rounds of 6 prompts in flight on both ranks' engines while the main threads run all-reduces
    ("training"), every collective recorded with the thread that issued it: a healthy round, then one whose
    engine ``die_engine`` dies in the background."""
    import threading

    seen: list[str] = []
    for name in ("all_gather_object", "all_reduce", "broadcast_object_list", "broadcast", "barrier"):
        real = getattr(dist, name)

        def wrapped(*a, _real=real, **kw):
            seen.append(threading.current_thread().name)
            return _real(*a, **kw)

        setattr(dist, name, wrapped)
    return {"ok": _async_round(delay, -1, seen), "failed": _async_round(delay / 5, die_engine, seen)}
