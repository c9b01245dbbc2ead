"""CPU test plumbing: where the ``sgl_kernel`` stand-in lives and how it is put on ``sys.path``.

The stand-in (``cpu_shim/sgl_kernel``) lets SGLang's CPU engine import on machines without a GPU;
it is not a kernel (see its docstring). ``launch/install_sglang_cpu_shim.py`` writes a ``.pth``
file that calls the same rule at interpreter start, so SGLang's spawned subprocesses get it too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHIM_DIR = str(Path(__file__).resolve().parent)


def activate(force: bool = False) -> bool:
    """Put the stand-in first on ``sys.path`` when ``SGLANG_USE_CPU_ENGINE=1`` (or ``force``).

    Returns True when the shim is (now) on the path. Must run before anything imports
    ``sgl_kernel``; a real ``sgl_kernel`` already imported is left alone.
    """
    if not force and os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return False
    loaded = sys.modules.get("sgl_kernel")
    if loaded is not None and not getattr(loaded, "IS_MEGATRON_PAPO_CPU_SHIM", False):
        return False
    if SHIM_DIR not in sys.path:
        sys.path.insert(0, SHIM_DIR)
    return True
