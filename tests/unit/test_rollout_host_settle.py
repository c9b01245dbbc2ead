"""The engine host lets SGLang's event loop finish what a rollout left behind after answering it, so that the next call
(a weight sync's ``begin_weight_update``) does not pay for it (``_sglang_host.settle``).

The host runs SGLang's asyncio loop only inside a call. Here a stand-in ``sglang.Engine`` (a fresh interpreter; the
real host loop ``host_main`` around it) ends each ``generate`` with a clean-up task that needs one more turn of the
loop, as finished request tasks do: it must run after the rollout's answer went out and before the next call starts."""

from __future__ import annotations

from tests.harness import run_probe

PROBE = r"""
import asyncio, sys, types

log = []

class Engine:
    def __init__(self, **kw):
        self.loop = asyncio.new_event_loop()

    def freeze_gc(self):
        pass

    def get_all_child_pids(self):
        return []

    def shutdown(self):
        log.append("shutdown")

    def generate(self, **kw):
        async def cleanup():
            await asyncio.sleep(0)
            log.append("clean-up")

        async def rollout():
            self.loop.create_task(cleanup())
            return [{"text": "x"}]

        out = self.loop.run_until_complete(rollout())
        log.append("generate")
        return out

    def flush_cache(self):  # like SGLang's: runs the loop until its own request is answered
        log.append("flush_cache")
        self.loop.run_until_complete(asyncio.sleep(0))

sys.modules["sglang"] = types.SimpleNamespace(Engine=Engine)

class Conn:
    def __init__(self, script):
        self.script = list(script)

    def recv(self):
        return self.script.pop(0)

    def send(self, msg):
        log.append(f"answer {msg[0]}")

from megatron_papo.rollout._sglang_host import host_main
host_main(Conn([("generate", {"input_ids": [1]}), ("flush_cache", {}), ("flush_cache", {}), ("shutdown", {})]), {}, {})
print(log)
"""


def test_rollout_leftovers_run_after_the_answer_and_before_the_next_call(tmp_path):
    assert run_probe(PROBE, tmp_path) == [str([
        "answer ok",  # started
        "generate", "answer ok", "clean-up",  # the rollout's clean-up after its answer ...
        "flush_cache", "answer ok", "flush_cache", "answer ok",  # ... not inside the next call; other calls: no extra turn
        "shutdown", "answer ok"])]
