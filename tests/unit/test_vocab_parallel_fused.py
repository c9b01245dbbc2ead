"""The optional compiled (``torch.compile``) block kernels, run on CPU against the float64 reference.

CI has no GPU: this checks the fused path's math (compiled by inductor for CPU), not its GPU speed.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.vocab_parallel_workers import CASES, error_ratios, make_case, run_local

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["bs_chunk4", "papo_published", "bf16_extreme"])
def test_fused_matches_float64_reference(name, monkeypatch):
    from megatron_papo.ops import vocab_parallel_fused as fused

    monkeypatch.setenv("MEGATRON_PAPO_VP_FUSED", "all")
    calls_before = fused.compiled.cache_info().hits + fused.compiled.cache_info().misses
    res = run_local(make_case(name), None, 0, 1)
    info = fused.compiled.cache_info()
    assert info.hits + info.misses > calls_before  # the compiled blocks really ran
    got = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in res.items()}
    assert got["returned"] == sorted(CASES[name].outputs) and got["inputs_unchanged"]
    ratios = error_ratios(name, got)
    assert all(r <= 1.0 for r in ratios.values()), ratios
    if not CASES[name].ref_grad:
        assert got["grad_xr"] is None


def test_fused_off_by_default(monkeypatch):
    from megatron_papo.ops import vocab_parallel_fused as fused

    monkeypatch.delenv("MEGATRON_PAPO_VP_FUSED", raising=False)
    assert not fused.enabled(torch.zeros(1))
    monkeypatch.setenv("MEGATRON_PAPO_VP_FUSED", "1")
    assert not fused.enabled(torch.zeros(1))  # "1" means CUDA inputs only
