"""Real sizes: Qwen2.5-VL-3B and -7B (published configs) built on the meta device have transformers' parameter counts."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed]


def _transformers_count(name: str) -> int:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models.qwen2_5_vl import PUBLISHED_CONFIGS

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**PUBLISHED_CONFIGS[name]))
    return sum(p.numel() for p in model.parameters())  # tied lm_head counted once


def test_published_param_counts_match_transformers():
    names = ["Qwen2.5-VL-3B", "Qwen2.5-VL-7B"]
    ours = run_distributed("tests.distributed.model_workers:param_counts", 1, {"names": names})[0]
    for name in names:
        assert ours[name] == _transformers_count(name), (name, ours[name])
    # the published totals (sanity on the written config values)
    assert ours["Qwen2.5-VL-3B"] == 3_754_622_976
    assert ours["Qwen2.5-VL-7B"] == 8_292_166_656
