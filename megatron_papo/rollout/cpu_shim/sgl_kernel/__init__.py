"""CPU test plumbing for SGLang — a stand-in for the CUDA-only ``sgl_kernel`` module. NOT a kernel.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports ``sgl_kernel`` and looks up
``*_cpu`` op names (module attributes and ``torch.ops.sgl_kernel.<name>_cpu``) at import time.
The real ``sglang-kernel`` wheel is CUDA-only and cannot load without a GPU driver, and no CPU
build exists on PyPI. This package only *answers* those names so SGLang imports: every op is a
stub that logs the call and RAISES ``NotImplementedError``. With ``attention_backend="torch_native"``
on a CPU without AMX, SGLang takes its pure-PyTorch paths and no op is ever called; if one is,
the error names it.

It is put first on ``sys.path`` only when ``SGLANG_USE_CPU_ENGINE=1`` (by the ``.pth`` file that
``launch/install_sglang_cpu_shim.py`` writes, or by ``megatron_papo.rollout.cpu_shim.activate``).
GPU machines never see it and use the installed wheel.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, NoReturn

import torch

__version__ = "0.0.0+cpu-shim"
IS_MEGATRON_PAPO_CPU_SHIM = True

_log = logging.getLogger("sgl_kernel_cpu_shim")

# ``*_cpu`` ops that SGLang resolves as ``torch.ops.sgl_kernel.<name>`` while importing/starting.
# (Found by starting the engine on CPU; extend if a new SGLang version resolves more.)
TORCH_OPS: tuple[str, ...] = (
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
)


def _stub(name: str) -> Callable[..., NoReturn]:
    def op(*args: Any, **kwargs: Any) -> NoReturn:
        msg = (f"sgl_kernel CPU shim: op {name!r} was called. This stand-in has no kernels; "
               "use attention_backend='torch_native' on a CPU without AMX, or install a real sgl_kernel.")
        _log.error(msg)
        print(msg, file=sys.stderr, flush=True)
        raise NotImplementedError(msg)

    op.__name__ = name
    op.__qualname__ = name
    return op


def __getattr__(name: str) -> Callable[..., NoReturn]:
    """Answer only ``*_cpu`` op names (as raising stubs); anything else is an AttributeError."""
    if name.endswith("_cpu") and not name.startswith("__"):
        fn = _stub(name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"sgl_kernel CPU shim has no {name!r} (only *_cpu names are answered)")


def _register_torch_ops() -> None:
    """Make ``torch.ops.sgl_kernel.<name>`` resolve to a raising stub for every name in ``TORCH_OPS``.

    The stub is set as an attribute of torch's ``sgl_kernel`` op namespace (no schema, so a call
    with any arguments reaches the stub, which logs and raises).
    """
    namespace = torch.ops.sgl_kernel
    for name in TORCH_OPS:
        if name.endswith("_cpu") and name not in namespace.__dict__:
            setattr(namespace, name, _stub(f"torch.ops.sgl_kernel.{name}"))


_register_torch_ops()
