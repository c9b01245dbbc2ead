"""CPU plumbing: SGLang's CPU engine forks its scheduler and detokenizer processes instead of spawning them.

Why: ``sglang.srt.entrypoints.engine`` forces the ``spawn`` start method (CUDA cannot survive a fork), so every
scheduler and detokenizer process imports SGLang again from nothing: ``import sglang.srt.managers.scheduler``
alone takes ~14 s on one idle core of the 2-core CI machine, and an engine start runs two such imports at once
next to the trainer. The process that creates the engine (our host, or the HTTP server) has imported all of it
already, so on CPU -- no CUDA context anywhere -- its children can be forked and start at once.

What: :func:`install` replaces the ``multiprocessing`` module that ``sglang.srt.entrypoints.engine`` uses for its
``Process`` and ``Pipe`` with :class:`ForkingMultiprocessing` (``fork`` context; SGLang's
``set_start_method("spawn", force=True)`` becomes a no-op there). Nothing else in the process changes: other
``multiprocessing`` users keep the process default. The children run the same code as spawned ones (the
scheduler entry point is still ``seeded.run_scheduler_process``, which applies the CPU patches in the child).
GPU engines never take this path: :func:`install` is a no-op unless ``SGLANG_USE_CPU_ENGINE=1`` and no CUDA device
is initialised in this process.

Caveat: the forking process must not have run multi-threaded torch compute before the engine starts. The OpenMP
thread pool of torch's CPU wheels does not survive a fork, so a forked scheduler hangs at its first parallel op
(seen with a script that built a model and then created an engine in the same process). The two callers qualify:
the engine host (``_sglang_host.host_main``) and the server launcher (``_sglang_server_main``) import SGLang and
create the engine first, in a fresh process.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

_FORK = multiprocessing.get_context("fork")


class ForkingMultiprocessing:
    """Stands in for the ``multiprocessing`` module inside SGLang's engine launcher: processes and pipes come
    from the ``fork`` context; every other attribute is the real module's."""

    Process = _FORK.Process
    Pipe = staticmethod(_FORK.Pipe)

    @staticmethod
    def set_start_method(method: str | None, force: bool = False) -> None:
        """Ignored: the launcher's processes fork (see the module docstring); the process default is unchanged."""

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def install() -> bool:
    """Make SGLang's engine launcher fork its processes in this process (CPU engines only).

    Returns True when installed; False (nothing changed) without ``SGLANG_USE_CPU_ENGINE=1`` or when CUDA is
    initialised here (a forked child could not use it).
    """
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return False
    import torch

    if torch.cuda.is_initialized():
        return False
    from sglang.srt.entrypoints import engine

    engine.mp = ForkingMultiprocessing()
    return True
