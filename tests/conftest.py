"""Shared fixtures: an offline tiny Qwen2.5-VL checkpoint (built once per session), GPU auto-skip."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


FULL = os.environ.get("MEGATRON_PAPO_FULL_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    """Deselect ``extended`` tests unless MEGATRON_PAPO_FULL_TESTS=1 (``launch/run_tests.sh --full``); skip GPU
    tests without CUDA."""
    import torch

    if not FULL:
        extended = [item for item in items if "extended" in item.keywords]
        if extended:
            config.hook.pytest_deselected(items=extended)
            items[:] = [item for item in items if "extended" not in item.keywords]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tests/gpu); CPU CI does not run this path")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny checkpoint (seed 0), built offline once per test session."""
    from megatron_papo.fixtures.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_untied_dir(tmp_path_factory):
    """A tiny checkpoint with untied embeddings and 4 layers (7B-like layout)."""
    from megatron_papo.fixtures.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_untied") / "model", num_layers=4, tie_word_embeddings=False,
                     seed=1)
