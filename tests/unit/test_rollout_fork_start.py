"""CPU engines fork SGLang's scheduler/detokenizer processes (``rollout/cpu_shim/fork_start.py``).

The check runs in a fresh interpreter that imports SGLang's real engine launcher module, as the engine host does.
A forked child sees a value its parent set at run time; a spawned one (SGLang's own choice) would import the
module afresh and not have it. Without ``SGLANG_USE_CPU_ENGINE=1`` (GPU engines) nothing is installed.
The engine-level checks (CPU engines start, generate and update weights with forked schedulers) are every test
in ``tests/integration``.
"""

from __future__ import annotations

from tests.harness import run_probe

PROBE = r"""
import multiprocessing
import os
from megatron_papo.rollout.cpu_shim import fork_start
from sglang.srt.entrypoints import engine


def child(conn):
    conn.send(getattr(fork_start, "RUNTIME_MARK", "fresh import"))


if __name__ == "__main__":
    os.environ.pop("SGLANG_USE_CPU_ENGINE", None)  # a GPU engine: nothing installed, SGLang's launcher as upstream
    print(fork_start.install(), engine.mp is multiprocessing)
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    print(fork_start.install(), type(engine.mp).__name__, engine.mp.Queue is multiprocessing.Queue)
    fork_start.RUNTIME_MARK = "set by the parent"
    before = multiprocessing.get_start_method(allow_none=True)
    engine.mp.set_start_method("spawn", force=True)  # what SGLang's _set_envs_and_config does
    reader, writer = engine.mp.Pipe(duplex=False)
    proc = engine.mp.Process(target=child, args=(writer,))
    proc.start()
    print(reader.recv(), multiprocessing.get_start_method(allow_none=True) == before)
    proc.join()
    print(proc.exitcode)
"""


def test_cpu_engine_launcher_forks_and_leaves_the_process_default_alone(tmp_path):
    assert run_probe(PROBE, tmp_path) == ["False True", "True ForkingMultiprocessing True", "set by the parent True", "0"]
