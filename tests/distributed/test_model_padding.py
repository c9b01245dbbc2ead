"""Sequence padding inside the model (sequence parallelism, FP8 GEMM alignment) never reaches the loss."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def test_seq_len_multiple():
    from megatron_papo.models.qwen2_5_vl.model import seq_len_multiple

    assert seq_len_multiple(1, False, False) == 1 and seq_len_multiple(2, False, False) == 1
    assert seq_len_multiple(2, True, False) == 2  # SP: the sequence splits over TP
    assert seq_len_multiple(1, False, True) == 16  # FP8 GEMMs: leading dims % 8, last dim % 16
    assert seq_len_multiple(4, True, True) == 64  # 16 tokens per TP shard under SP
    assert seq_len_multiple(4, False, True) == 16


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)])
def test_fp8_padding_is_invisible_to_the_logprobs(tiny_model_dir, tp, sp):
    res = run_distributed("tests.distributed.model_workers:fp8_padding_is_invisible", tp,
                          {"hf_dir": str(tiny_model_dir), "tp": tp, "sp": sp})[0]
    assert res["seq_len"] % 16 != 0, res  # the batch really needs padding
    assert res["base_multiple"] == (tp if sp else 1) and res["fp8_multiple"] == 16 * (tp if sp else 1)
    base_len, fp8_len = res["lm_lengths"]
    assert fp8_len % res["fp8_multiple"] == 0 and fp8_len > res["seq_len"], res  # the LM ran on an aligned length
    assert base_len == res["seq_len"] + (-res["seq_len"]) % res["base_multiple"]
    assert res["tokens"] > 0 and res["max_diff"] <= 1e-5, res  # and the padding changed no log-prob
