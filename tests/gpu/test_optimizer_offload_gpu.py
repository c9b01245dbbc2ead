"""GPU only (skipped without CUDA; never run by CI, and not yet run on a GPU): optimizer CPU offload puts the
offloaded share of the fp32 master weights in host memory and takes that much less device memory.

The CPU test (tests/distributed/test_optimizer_offload.py) checks the structure: the hybrid optimizer receives the
bf16 shards and owns every fp32 master. This one checks the placement, which the hybrid optimizer decides by
``param.is_cuda`` and so only a GPU can show.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_offloaded_masters_live_in_host_memory(tiny_model_dir):
    fraction = 0.5
    (r,) = run_distributed("tests.distributed.optimizer_workers:hybrid_optimizer_on_gpu", 1,
                           {"hf_dir": str(tiny_model_dir), "cpu_offload_fraction": fraction})
    plain, off = r["0.0"], r[str(fraction)]
    assert plain["inner"] != "HybridDeviceOptimizer" and off["inner"] == "HybridDeviceOptimizer"
    total = off["fp32_on_cpu"] + off["fp32_on_gpu"]
    # the hybrid optimizer offloads whole shards until it reaches fraction x the device numel
    assert fraction * total <= off["fp32_on_cpu"] < fraction * total + off["largest_shard"], off
    # the plain distributed optimizer holds a full fp32 master shard on the device; offload keeps only the rest
    assert off["optimizer_bytes_on_gpu"] < plain["optimizer_bytes_on_gpu"], (plain, off)
