"""GPU suite fixtures. Every test under tests/gpu needs CUDA and skips itself without it (CPU CI)."""

from __future__ import annotations

import json
import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory):
    """The tiny Qwen2.5-VL with GPU-friendly dimensions (head_dim 64, FP8-aligned GEMMs), built offline."""
    from megatron_papo.fixtures.tiny import make_tiny
    from tests.gpu.gpu_workers import GPU_TINY

    return make_tiny(tmp_path_factory.mktemp("gpu_tiny") / "model", **GPU_TINY)


def record(name: str, values: dict) -> None:
    """Print a test's measured numbers and append them to ``$GPU_SMOKE_RESULTS`` (tools/gpu_smoke.sh) as JSON."""
    line = json.dumps({"test": name, **values}, default=float)
    print(line)
    path = os.environ.get("GPU_SMOKE_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
