"""A CPU engine's cache flush (every weight sync) collects the young generations only (``cpu_shim/flush_gc.py``).

SGLang's CPU ``empty_cache`` is a full ``gc.collect()``; after a rollout that walk was ~12 ms of a ~28 ms sync. Checked in
a fresh interpreter (the patch is process-global): SGLang's own method collects generation 2; after the patch (applied by
the scheduler entry point ``seeded.run_scheduler_process``) a flush collects generation 1 and still frees a new cycle."""

from __future__ import annotations

from tests.harness import run_probe

PROBE = r"""
import gc, os, weakref
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
from megatron_papo.rollout import cpu_shim
cpu_shim.activate()
from sglang.srt.platforms.cpu import CpuDeviceMixin
import sglang.srt.managers.scheduler as scheduler
from megatron_papo.rollout.cpu_shim import flush_gc, seeded

gc.disable()  # only the collections asked for below
seen = []
gc.callbacks.append(lambda phase, info: seen.append(info["generation"]) if phase == "start" else None)
CpuDeviceMixin.empty_cache(None)
print("upstream", seen)

scheduler.run_scheduler_process = lambda *a, **k: "scheduler ran"
print(seeded.run_scheduler_process(), CpuDeviceMixin.empty_cache is flush_gc._empty_cache, flush_gc.patch_sglang())

class Node:
    pass

node = Node()
node.me = node  # a reference cycle: refcounting alone never frees it
alive = weakref.ref(node)
del node
seen.clear()
CpuDeviceMixin.empty_cache(None)
print("patched", seen, alive() is None)
"""


def test_flush_collects_young_generations_only_and_frees_new_cycles(tmp_path):
    assert run_probe(PROBE, tmp_path) == ["upstream [2]", "scheduler ran True False", "patched [1] True"]
