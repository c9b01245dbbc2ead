"""One PolicyModel step on one GPU: bf16 with local layers, with Transformer Engine, and with FP8 (odd sequence
length, so the model's FP8 padding is exercised). Checks finite loss and grad norm, actor == reference at step 1
and PPO ratio == 1 within the dtype tolerances (megatron_papo/invariants.py), parameters on the GPU, and (TE) that
the HF names round-trip. Skipped without CUDA; NOT run by CI.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.gpu.conftest import record
from tests.harness import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ENV = {"MEGATRON_PAPO_TEST_BACKEND": "cpu:gloo,cuda:nccl"}


def _step(hf_dir, **kw) -> dict:
    (res,) = run_distributed("tests.gpu.gpu_workers:policy_step", 1, {"hf_dir": str(hf_dir), **kw}, env=ENV, timeout=600)
    return res


def _check(name: str, res: dict) -> None:
    record(name, res)
    assert res["params_on_cuda"], res
    assert math.isfinite(res["loss"]) and math.isfinite(res["grad_norm"]) and res["grad_norm"] > 0, res
    assert res["actor_ref_gap"] <= res["gap_tol"], res
    assert abs(res["ppo_kl"]) <= res["mean_tol"], res
    assert -20 < res["logprob_mean"] < 0, res


def test_bf16_local_layers_step(gpu_model_dir):
    _check("bf16_local", _step(gpu_model_dir))


def test_transformer_engine_step_and_hf_names(gpu_model_dir):
    pytest.importorskip("transformer_engine", reason="Transformer Engine comes with the GPU container")
    res = _step(gpu_model_dir, impl="transformer_engine")
    _check("bf16_te", res)
    assert res["hf_roundtrip_max_diff"] == 0.0, res  # bf16 weights exported exactly under their checkpoint names


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_step_at_an_odd_sequence_length(gpu_model_dir, recipe):
    pytest.importorskip("transformer_engine", reason="Transformer Engine comes with the GPU container")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada/Hopper or newer")
    res = _step(gpu_model_dir, impl="transformer_engine", fp8="hybrid", fp8_recipe=recipe)
    assert res["seq_len"] % 16 != 0 and res["seq_multiple"] == 16, res  # padded inside the model, not by the batch
    _check(f"fp8_{recipe}", res)
