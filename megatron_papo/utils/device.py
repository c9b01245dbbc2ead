"""The one host/device boundary of the trainer.

Batches are built on the host (``data/collate.py``, ``actor.make_micro_batches``); :func:`to_device`
moves one micro-batch (every tensor in it, nested dicts/lists included) to the model's device right
before its forward, and :func:`to_host` brings per-token results back. Nothing else in the data path
knows which device it runs on: it follows the tensors it is given.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device`` (dicts, lists and tuples are rebuilt; other values kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def to_host(obj: Any) -> Any:
    """``obj`` with every tensor detached and on the host (blocking: safe to read right away). A device tensor is
    copied; a tensor already on the CPU is returned detached, not copied (it shares storage with the input)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj
