"""Megatron-Core CPU compatibility layer (applied only when the device is CPU).

Megatron-Core 0.16.1 assumes CUDA in a handful of places. Each patch below is small, named, and
covered by a test in ``tests/unit/test_cpu_compat.py`` / ``tests/distributed/test_mcore_cpu.py``
that fails without it. ``apply_cpu_compat()`` is idempotent and never runs on a CUDA device.

| patch              | what breaks on CPU                                                        |
|--------------------|---------------------------------------------------------------------------|
| ``rng_tracker``    | tensor_parallel/random.py tracker ``add``/``fork`` use ``torch.cuda`` RNG  |
| ``recompute_rng``  | activation recomputation (``CheckpointFunction``) saves/restores the CUDA  |
|                    | RNG state via ``_get/_set_cuda_rng_state``: use the CPU generator's state  |
| ``current_device`` | ``torch.cuda.current_device()`` in param_and_grad_buffer / p2p / optimizer |
| ``synchronize``    | ``torch.cuda.synchronize()`` in pipeline p2p communication                 |
| ``sp_torch_norm``  | torch norm asserts ``not sequence_parallel``; built with SP off, params  |
|                    | tagged ``sequence_parallel=True`` so their grads are all-reduced over TP  |
| ``device_mode``    | hard-coded ``device="cuda"`` / ``.cuda()`` in schedules, optimizer,       |
|                    | clip_grads, distrib_optimizer; ``tensor.type()`` checks that want          |
|                    | ``torch.cuda.FloatTensor`` (clip_grads assert, distributed optimizer)      |
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

_APPLIED: dict[str, bool] = {}

_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to CPU inside torch calls, and reports CPU tensor types by CUDA names.

    ``tensor.type()`` (no argument) answers ``torch.cuda.FloatTensor`` for a CPU float tensor so that
    Megatron-Core's dtype-by-type-name checks (clip_grads, distributed optimizer) accept CPU params.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Named RNG states on the CPU generator, with the interface of mcore's CudaRNGStatesTracker."""

    def __init__(self, *_: Any, **__: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def initialize_rng_tracker(*_: Any, force_reset: bool = False, **__: Any) -> None:
        if force_reset or not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    initialize_rng_tracker(force_reset=True)


def _patch_recompute_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]


def _patch_sp_torch_norm() -> None:
    import dataclasses

    from megatron.core.transformer import torch_norm

    orig_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args, **kwargs):  # noqa: N807
        if not config.sequence_parallel:
            return orig_new(cls, config, hidden_size, *args, **kwargs)
        norm = orig_new(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


_MODE: CudaToCpuMode | None = None


def _patch_device_mode() -> None:
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays active for the life of the (CPU) process


PATCHES: dict[str, Callable[[], None]] = {
    "rng_tracker": _patch_rng_tracker,
    "recompute_rng": _patch_recompute_rng,
    "current_device": _patch_current_device,
    "synchronize": _patch_synchronize,
    "sp_torch_norm": _patch_sp_torch_norm,
    "device_mode": _patch_device_mode,
}


def apply_cpu_compat(only: tuple[str, ...] | None = None) -> list[str]:
    """Apply the named CPU patches (all by default) once per process; returns the names applied now."""
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_compat() is for CPU runs only; CUDA is available on this machine")
    applied = []
    for name, fn in PATCHES.items():
        if only is not None and name not in only:
            continue
        if not _APPLIED.get(name):
            fn()
            _APPLIED[name] = True
            applied.append(name)
    return applied


def applied_patches() -> list[str]:
    """Names of the patches active in this process."""
    return [k for k, v in _APPLIED.items() if v]
