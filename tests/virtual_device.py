"""A virtual accelerator for CPU-only machines: device discipline checked with real computation.

PyTorch's ``FakeTensorMode`` gives fake ``cuda`` tensors on a CPU-only machine, but it cannot run the
data-dependent parts of the vision path (``nonzero``, ``.tolist()`` in the M-RoPE index) and backward
through a CUDA-typed tensor needs a CUDA driver. This harness proves the same thing with real numbers:

* :class:`VirtualTensor` wraps a CPU tensor and *reports* the virtual device (``meta``: the one
  non-CPU device type whose autograd needs no driver). Every op unwraps, computes on the CPU, and
  wraps the result again.
* An op that meets a virtual tensor and a host tensor (other than a 0-dim scalar, or the index
  tensors of advanced indexing, or a cross-device ``copy_``, all of which CUDA accepts) raises
  :class:`DeviceMismatchError` — exactly where a CUDA run would stop with "Expected all tensors to be
  on the same device".
* :class:`VirtualDeviceMode` makes factory calls and moves that name an accelerator (``cuda``,
  ``meta``, an int index, ``.cuda()``, ``.to(device)``) create virtual tensors, as they would create
  CUDA tensors on a GPU. ``device="cpu"`` stays on the host.

So parameters built by mcore on ``torch.cuda.current_device()`` are virtual, a batch the project moves
with its one host-to-device function is virtual, and any tensor that reaches the model or the loss
without that move is a host tensor that trips the check.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

VIRTUAL = torch.device("meta")
aten = torch.ops.aten

#: ops CUDA accepts with host operands of any size (index tensors of advanced indexing, cross-device copies)
CROSS_DEVICE_OK = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
                   aten.index_put.default, aten._index_put_impl_.default, aten.lift_fresh.default}

_CUDA_TYPE = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
              torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
              torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
              torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor"}


class DeviceMismatchError(RuntimeError):
    """A host tensor and a device tensor met in one op (a CUDA run would fail here)."""


class VirtualTensor(torch.Tensor):
    """A CPU tensor that reports the virtual device; see the module docstring."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> VirtualTensor:
        if isinstance(inner, VirtualTensor):
            return inner
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=VIRTUAL, requires_grad=inner.requires_grad)
        r.inner = inner
        return r

    @property
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        """``t.data = other`` (mcore's ``make_viewless_tensor``, DDP buffers): take the other's values too."""
        if not isinstance(value, VirtualTensor):
            raise DeviceMismatchError("t.data = <host tensor> on a device tensor (a CUDA run moves it off the device)")
        torch._C.TensorBase.data.__set__(self, value)
        self.inner = value.inner

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"VirtualTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if not isinstance(t, VirtualTensor) and t.dim() > 0 and t.device.type == "cpu"]
        if host and len(host) < len(tensors) and func not in CROSS_DEVICE_OK:
            shapes = [tuple(t.shape) for t in host]
            raise DeviceMismatchError(f"{func}: host tensor(s) of shape {shapes} meet device tensors "
                                      "(a CUDA run fails here: move the input to the device first)")
        inner_args = tree_map(_unwrap, args)
        inner_kwargs = tree_map(_unwrap, kwargs)
        if func is aten._to_copy.default and kwargs.get("device") is not None and not _is_virtual(kwargs["device"]):
            return func(*inner_args, **inner_kwargs)  # device -> host: a real CPU tensor
        if func is aten._to_copy.default:
            inner_kwargs = {**inner_kwargs, "device": torch.device("cpu")}
        out = func(*inner_args, **inner_kwargs)
        inputs = {id(_unwrap(a)): a for a in tensors}
        return tree_map(lambda t: _wrap_result(t, inputs), out)


def _unwrap(x: Any) -> Any:
    return x.inner if isinstance(x, VirtualTensor) else x


def _wrap_result(t: Any, inputs: dict[int, Any]) -> Any:
    if not isinstance(t, torch.Tensor) or isinstance(t, VirtualTensor):
        return t
    same = inputs.get(id(t))
    if same is not None and isinstance(same, VirtualTensor):
        return same  # in-place op / out=: the same wrapper, as CUDA returns the same tensor
    return VirtualTensor(t)


def _is_virtual(dev: Any) -> bool:
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith(("cuda", "meta"))
    if isinstance(dev, torch.device):
        return dev.type in ("cuda", "meta")
    return False


def to_virtual(t: torch.Tensor) -> VirtualTensor:
    """A host tensor's copy on the virtual device (no autograd history: use for data and fresh parameters)."""
    if isinstance(t, VirtualTensor):
        return t
    if t.requires_grad and t.grad_fn is not None:
        raise RuntimeError("virtual device: cannot move a tensor with autograd history")
    return VirtualTensor(t.detach().clone()).requires_grad_(t.requires_grad)


def _target_device(args: tuple, kwargs: dict) -> Any:
    if "device" in kwargs:
        return kwargs["device"]
    if len(args) > 1:
        a = args[1]
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (str, int, torch.device)) and not isinstance(a, bool):
            return a
    return None


class VirtualDeviceMode(TorchFunctionMode):
    """Factory calls and moves that name an accelerator create virtual tensors (see the module docstring)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(args[0], VirtualTensor):
            return _CUDA_TYPE.get(args[0].dtype, "torch.cuda.Tensor")
        if func in (torch.tensor, torch.as_tensor) and args:  # values of device scalars are read (a sync on CUDA)
            args = (tree_map(lambda t: t.inner if isinstance(t, VirtualTensor) else t, args[0]), *args[1:])
        if func is torch.Tensor.tolist and isinstance(args[0], VirtualTensor):
            return args[0].inner.tolist()  # a device -> host sync, as on CUDA
        if func is torch.Tensor.numpy and isinstance(args[0], VirtualTensor):
            raise DeviceMismatchError("Tensor.numpy() of a device tensor (CUDA refuses it: call .cpu() first)")
        if func is torch.Tensor.cuda:
            return to_virtual(args[0])
        if func is torch.Tensor.to:
            dev = _target_device(args, kwargs)
            x = args[0]
            if dev is not None and _is_virtual(dev) and not isinstance(x, VirtualTensor):
                rest = {k: v for k, v in kwargs.items() if k in ("dtype",)}
                pos_dtype = [a for a in args[1:] if isinstance(a, torch.dtype)]
                if pos_dtype:
                    rest["dtype"] = pos_dtype[0]
                return to_virtual(x.to(**rest) if rest else x)
            if dev is not None and _is_virtual(dev):  # already on the device: only a dtype change may remain
                dt = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
                return x if dt is None else func(x, dtype=dt)
            return func(*args, **kwargs)
        dev = kwargs.get("device")
        if dev is not None and _is_virtual(dev):
            out = func(*args, **{**kwargs, "device": "cpu"})
            return tree_map(lambda t: to_virtual(t) if isinstance(t, torch.Tensor) else t, out)
        return func(*args, **kwargs)


class VirtualFactoryMode(TorchDispatchMode):
    """Factory ops issued below the Python API (inside composite ops such as SDPA's math path, which take the
    device of their inputs) would make real, empty ``meta`` tensors: create them on the CPU and wrap them."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and _is_virtual(dev) and func is not aten._to_copy.default:
            out = func(*args, **{**kwargs, "device": torch.device("cpu")})
            return tree_map(lambda t: VirtualTensor(t) if isinstance(t, torch.Tensor) else t, out)
        return func(*args, **kwargs)


@contextlib.contextmanager
def virtual_device(patch_cuda: bool = True) -> Iterator[torch.device]:
    """Run the block with the virtual device active; ``torch.cuda.current_device()`` answers index 0 (what
    mcore allocates on) inside. Yields the device to put in ``ParallelGroups.device``."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    saved = torch.cuda.current_device
    names = ("isend", "irecv", "send", "recv", "batch_isend_irecv")
    p2p = {name: getattr(c10d, name) for name in names}
    if patch_cuda:
        torch.cuda.current_device = lambda: 0  # type: ignore[assignment]
    # point-to-point calls pick their backend from the tensor's device before dispatch: hand them the CPU
    # storage behind a virtual tensor (a receive writes into it, so the wrapper sees the data). Patched in both
    # namespaces: P2POp checks its op against c10d's own isend/irecv.
    patched = {name: _p2p_on_inner(p2p[name]) for name in names[:4]}
    patched["batch_isend_irecv"] = lambda ops: p2p["batch_isend_irecv"](
        [dist.P2POp(op.op, _unwrap(op.tensor), op.peer, op.group, op.tag) for op in ops])
    for name, fn in patched.items():
        setattr(dist, name, fn)
        setattr(c10d, name, fn)
    try:
        with VirtualDeviceMode(), VirtualFactoryMode():
            yield VIRTUAL
    finally:
        torch.cuda.current_device = saved  # type: ignore[assignment]
        for name, fn in p2p.items():
            setattr(dist, name, fn)
            setattr(c10d, name, fn)


def _p2p_on_inner(fn: Callable) -> Callable:
    def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return fn(_unwrap(tensor), *args, **kwargs)

    return call


def is_virtual(t: Any) -> bool:
    """Whether ``t`` is a tensor on the virtual device."""
    return isinstance(t, VirtualTensor)
