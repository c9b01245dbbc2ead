"""Device discipline on a CPU-only machine: one actor step with the model on a virtual accelerator.

The parameters are built where mcore builds them on a GPU (``torch.cuda.current_device()``), which the
harness (tests/virtual_device.py) turns into tensors that report a non-CPU device and compute on the CPU.
Any host tensor that reaches the model, the kernel or the loss without the project's one host-to-device
move raises there, as CUDA would. The same step on plain CPU parameters gives the numbers to compare.
"""

from __future__ import annotations

import math

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * max(1.0, abs(b))


def test_actor_step_on_a_virtual_device_equals_the_cpu_step(tiny_model_dir):
    (res,) = run_distributed("tests.distributed.device_workers:cpu_and_virtual", 1, {"hf_dir": str(tiny_model_dir)})
    cpu, dev = res["cpu"], res["dev"]
    assert dev["params_on_device"] is True  # mcore built every parameter on the (virtual) device
    assert dev["host_batch_rejected"], "the harness must reject a host batch at a device model"
    assert dev["stats_on_host"] is True  # per-token results come back to the host in one place
    # same numbers: the harness computes for real (SDPA takes its math path on the wrapper: rounding differs)
    diff = max(abs(a - b) for ra, rb in zip(dev["old"], cpu["old"]) for a, b in zip(ra, rb))
    assert diff <= 1e-5, diff
    for k, v in cpu["metrics"].items():
        assert _close(dev["metrics"][k], v), (k, dev["metrics"][k], v)
    assert cpu["metrics"]["grad_norm"] > 0 and dev["param_step"] > 1e-4  # the optimizer stepped on the device


@pytest.mark.slow
def test_pipeline_parallel_step_on_a_virtual_device(tiny_model_dir):
    """PP=2: activations cross stages through p2p on the device; the batch moves once per stage."""
    res = run_distributed("tests.distributed.device_workers:cpu_and_virtual", 2, {"hf_dir": str(tiny_model_dir), "pp": 2})
    cpu, dev = [r["cpu"] for r in res], [r["dev"] for r in res]
    assert all(r["params_on_device"] for r in dev)
    last_cpu, last_dev = cpu[-1], dev[-1]
    assert max(abs(a - b) for ra, rb in zip(last_dev["old"], last_cpu["old"]) for a, b in zip(ra, rb)) <= 1e-5
    for k, v in last_cpu["metrics"].items():
        assert _close(last_dev["metrics"][k], v), (k, last_dev["metrics"][k], v)
