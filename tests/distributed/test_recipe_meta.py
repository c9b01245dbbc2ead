"""Every recipe x layout the README shows builds its model on the meta device, at its real TP size.

What CI covers here: each combination's resolved config, its language-model and vision TransformerConfigs exactly as
a GPU run builds them (bf16, FP8 fields, sequence parallel, recompute; mcore validates them), and the whole model
built from those configs at the layout's TP x PP on 4 gloo ranks, with the published parameter totals when the
shards of a TP group are added up.

What only the GPU suite covers (``tests/gpu``; CI never runs it): the layers are built from the local spec here,
because the Transformer Engine spec needs TE and CUDA. So TE's modules (fused norm+linear, TE attention), their FP8
weights and ``fp8_autocast``/``Float8CurrentScaling`` with those configs, and FP8 GEMM shapes are not exercised.
"""

from __future__ import annotations

import pytest

from tests.harness import run_distributed
from tests.recipes import README_EXAMPLE, combinations

pytestmark = [pytest.mark.distributed]

TOTALS = {"3b": 3_754_622_976, "7b": 8_292_166_656}  # transformers' counts (tests/distributed/test_model_meta.py)


def test_every_recipe_and_layout_builds_on_meta():
    combos = combinations()
    results = run_distributed("tests.distributed.model_workers:meta_build_recipes", 4, {"combos": combos},
                              timeout=600)
    assert all(r == results[0] for r in results[1:])  # every rank saw the same totals
    res = results[0]
    # recipes of one size differ only in algorithm settings, and 3b_2gpu / 3b_4gpu are the same TP=1 model:
    # {3b: 2 models, 7b: 3 models} x (bf16, fp8)
    assert res.pop("_builds") == 10
    for combo in combos:
        r = res[combo]
        size = "7b" if combo.split(",")[0].endswith("7b") else "3b"
        fp8 = combo.endswith("layouts/fp8")
        assert r["params"] == TOTALS[size], (combo, r)
        assert r["dtype"] == "torch.bfloat16" and r["vision_fp8"] is None, (combo, r)
        assert (r["fp8"], r["fp8_recipe"] if fp8 else None, r["first_last_bf16"]) == (
            ("hybrid", "tensorwise", True) if fp8 else (None, None, False)), (combo, r)
        assert r["sequence_parallel"] == (r["tp"] > 1), (combo, r)
        # the LM pads its sequence for SP (a multiple of TP) and for FP8 GEMMs (16 tokens per TP shard)
        assert r["seq_multiple"] == (r["tp"] if r["tp"] > 1 else 1) * (16 if fp8 else 1), (combo, r)
    assert res[README_EXAMPLE]["tp"] == 4 and res[README_EXAMPLE]["fp8"] == "hybrid"
