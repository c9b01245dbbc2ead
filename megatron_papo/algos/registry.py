"""The name -> function registry of the pluggable algorithm pieces (lives in ``utils/registry.py``, which the
reward workers import without pulling in torch)."""

from megatron_papo.utils.registry import Registry

__all__ = ["Registry"]
