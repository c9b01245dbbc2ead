"""Activation recomputation (``model.recompute`` full | selective) leaves log-probs and gradients unchanged.

On CPU this needs Megatron-Core's ``CheckpointFunction`` to save/restore an RNG state without CUDA
(``tensor_parallel.random._get_cuda_rng_state``); until ``parallel/cpu.py`` covers that, the run fails
with "Found no NVIDIA driver" and the test is an expected failure (non-strict, so it passes once fixed).
"""

from __future__ import annotations

import pytest

from tests.harness import DistributedRunError, run_distributed

pytestmark = [pytest.mark.distributed]


@pytest.mark.xfail(raises=DistributedRunError, strict=False,
                   reason="parallel/cpu.py does not yet patch mcore CheckpointFunction's CUDA RNG state on CPU")
def test_recompute_is_exact(tiny_untied_dir):
    res = run_distributed("tests.distributed.model_workers:recompute_check", 1,
                          {"hf_dir": str(tiny_untied_dir), "tp": 1})[0]
    assert all(v == 0.0 for v in res.values()), res
