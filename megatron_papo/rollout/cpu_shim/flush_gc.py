"""CPU plumbing: a cache flush in a CPU engine's scheduler collects the young garbage only.

Why: SGLang 0.5.23's CPU platform implements ``empty_cache`` (called by ``Scheduler.flush_cache``, so by every
weight sync) as a full ``gc.collect()``: a walk of every object the scheduler has allocated since its start-up
objects were frozen (``Engine.freeze_gc``). After a rollout that walk took ~12 ms of a ~28 ms weight sync to one
engine (py-spy of the scheduler: ``Scheduler.flush_cache`` -> ``CpuDeviceMixin.empty_cache``), and with two
engines on two cores each engine's walk competes with the other's sync. ``torch`` has no CPU allocator cache to
empty, and refcounting already freed everything that is not in a reference cycle.

What :func:`patch_sglang` changes (in each CPU scheduler process, from ``seeded.run_scheduler_process``):
``CpuDeviceMixin.empty_cache`` collects generations 0 and 1 (:data:`FLUSH_GENERATION`), where the cycles made
since the last automatic collection are; older cycles are left to Python's automatic collector, which keeps
running (its thresholds are not changed). GPU platforms are untouched.
"""

from __future__ import annotations

import gc

#: the oldest generation a flush collects (SGLang's CPU platform collects all three, ``gc.collect()`` = 2)
FLUSH_GENERATION = 1

_PATCHED = False


def collect_young() -> int:
    """``gc.collect(FLUSH_GENERATION)``; returns the number of unreachable objects found."""
    return gc.collect(FLUSH_GENERATION)


def _empty_cache(self: object) -> None:
    collect_young()


def patch_sglang() -> bool:
    """Point SGLang's CPU ``empty_cache`` at :func:`collect_young` (idempotent); True when applied now."""
    global _PATCHED
    if _PATCHED:
        return False
    from sglang.srt.platforms.cpu import CpuDeviceMixin

    CpuDeviceMixin.empty_cache = _empty_cache
    _PATCHED = True
    return True
