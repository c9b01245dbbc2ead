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


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * max(1.0, abs(b))


def test_actor_step_on_a_virtual_device_equals_the_cpu_step(tiny_model_dir):
    worker = "tests.distributed.device_workers:actor_step"
    (cpu,) = run_distributed(worker, 1, {"hf_dir": str(tiny_model_dir), "virtual": False})
    (dev,) = run_distributed(worker, 1, {"hf_dir": str(tiny_model_dir), "virtual": True})
    assert dev["params_on_device"] is True  # mcore built every parameter on the (virtual) device
    assert dev["host_batch_rejected"], "the harness must reject a host batch at a device model"
    assert dev["stats_on_host"] is True  # per-token results come back to the host in one place
    assert dev["old"] == cpu["old"]  # same numbers: the harness computes for real
    for k, v in cpu["metrics"].items():
        assert _close(dev["metrics"][k], v), (k, dev["metrics"][k], v)
    assert cpu["metrics"]["grad_norm"] > 0 and _close(dev["param_sum"], cpu["param_sum"], 1e-9)


@pytest.mark.slow
def test_pipeline_parallel_step_on_a_virtual_device(tiny_model_dir):
    """PP=2: activations cross stages through p2p on the device; the batch moves once per stage."""
    worker = "tests.distributed.device_workers:actor_step"
    cpu = run_distributed(worker, 2, {"hf_dir": str(tiny_model_dir), "virtual": False, "pp": 2})
    dev = run_distributed(worker, 2, {"hf_dir": str(tiny_model_dir), "virtual": True, "pp": 2})
    assert all(r["params_on_device"] for r in dev)
    last_cpu, last_dev = cpu[-1], dev[-1]
    assert last_dev["old"] == last_cpu["old"]
    for k, v in last_cpu["metrics"].items():
        assert _close(last_dev["metrics"][k], v), (k, last_dev["metrics"][k], v)
