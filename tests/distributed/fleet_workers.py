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
