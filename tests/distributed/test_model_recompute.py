"""Activation recomputation (``model.recompute`` full | selective) leaves log-probs and gradients unchanged.

On CPU this needs Megatron-Core's ``CheckpointFunction`` to save/restore an RNG state without CUDA
(``tensor_parallel.random._get_cuda_rng_state``): the ``recompute_rng`` patch of ``parallel/cpu.py``.
"""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed]


def test_recompute_is_exact(tiny_untied_dir):
    res = run_distributed("tests.distributed.model_workers:recompute_check", 1,
                          {"hf_dir": str(tiny_untied_dir), "tp": 1})[0]
    assert all(v == 0.0 for v in res.values()), res
