"""Optimizer CPU offload builds mcore's hybrid optimizer on the precision-aware path (structure, on CPU).

What CI covers: with ``optim.cpu_offload_fraction > 0`` the distributed optimizer wraps a ``HybridDeviceOptimizer``
that receives the bf16 parameter shards themselves and owns every fp32 master copy, and the distributed optimizer
keeps none of its own (without the precision-aware flag it keeps a full fp32 master shard on the model's device).

What only a GPU confirms (the hybrid optimizer needs CUDA streams; tests/gpu): that the offloaded share's masters
and Adam state land in host memory (it splits by ``param.is_cuda``), the gradient/parameter copies between devices,
the step's numbers, and a checkpoint save/resume of its state.
"""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed]


def test_hybrid_optimizer_owns_the_fp32_masters(tiny_model_dir):
    (r,) = run_distributed("tests.distributed.optimizer_workers:hybrid_optimizer_structure", 1,
                           {"hf_dir": str(tiny_model_dir), "cpu_offload_fraction": 0.5})
    assert (r["outer"], r["inner"]) == ("DistributedOptimizer", "HybridDeviceOptimizer") and r["bf16_shards"] > 0
    assert r["distopt_fp32_masters"] == 0, r  # no fp32 copy of the shards held beside the hybrid optimizer
    assert r["precision_aware"]
    assert r["hdo_params_are_shards"] and r["hdo_param_dtypes"] == ["torch.bfloat16"], r
    assert (r["hdo_fp32_masters"], r["hdo_fp32_numel"]) == (r["bf16_shards"], r["shard_numel"]), r
    assert r["hdo_fp32_dtypes"] == ["torch.float32"]
