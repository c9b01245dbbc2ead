"""The actor's micro-batches run the vision tower once per prompt and give the same logits as per-row images."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


def test_group_image_dedupe_is_exact(tiny_model_dir):
    (res,) = run_distributed("tests.distributed.actor_workers:dedupe_equals_naive", 1, {"hf_dir": str(tiny_model_dir)})
    assert res["distinct_images"] == 2 and res["slots"] == [0, 0, 0, 1, 1, 1]
    assert res["scale"] > 0.1 and res["max_diff"] <= 1e-6


def test_split_by_tokens_respects_the_budget():
    from megatron_papo.actor import split_by_tokens

    lengths = [5, 40, 7, 40, 12, 3, 90, 20]
    chunks = split_by_tokens(list(range(8)), lengths, 80)
    assert sorted(r for c in chunks for r in c) == list(range(8))
    assert chunks[0] == [6]  # longer than the budget: alone
    for c in chunks:
        assert len(c) == 1 or len(c) * max(lengths[r] for r in c) <= 80
        assert [lengths[r] for r in c] == sorted((lengths[r] for r in c), reverse=True)
    assert chunks[1] == [1, 3]  # equal lengths keep row order
    with pytest.raises(ValueError, match="positive"):
        split_by_tokens([0], [1], 0)


def test_token_budget_update_equals_fixed_micro_batches(tiny_model_dir):
    (res,) = run_distributed("tests.distributed.actor_workers:token_budget_update_equals_fixed", 1,
                             {"hf_dir": str(tiny_model_dir)})
    assert res["rows"] == list(range(12)) and res["max_tokens"] <= res["budget"]
    assert res["n_micro"][1] != res["n_micro"][0] and res["padded"][1] < res["padded"][0]
    assert res["old_diff"] <= 1e-6  # per-token log-probs do not depend on the micro-batch split
    fl, bl = res["loss"]
    assert abs(fl - bl) <= 1e-6 * max(1.0, abs(fl)), res["loss"]
    fg, bg = res["grad_norm"]
    assert fg > 0 and abs(fg - bg) <= 1e-5 * fg, res["grad_norm"]
    assert res["param_step"] > 1e-4  # the update happened
    assert res["grad_max"] > 0 and res["grad_diff"] <= 1e-6 * res["grad_max"], (res["grad_diff"], res["grad_max"])
    for name in ("packed", "packed_paired"):
        p = res[name]
        assert p["rows"] == list(range(12)) and p["packed_tokens"] < p["ref_padded"], (name, p)
        assert p["packed_rows"] < 12  # several samples share a packed row
        assert p["old_diff"] <= 1e-6, (name, p["old_diff"])  # segment attention/positions = separate rows
        for key, (ref, got) in p["metrics"].items():
            assert abs(ref - got) <= 1e-5 * max(1.0, abs(ref)), (name, key, ref, got)
        assert p["grad_max"] > 0 and p["grad_diff"] <= 1e-6 * p["grad_max"], (name, p["grad_diff"], p["grad_max"])
    assert abs(res["packed_paired"]["metrics"]["loss/kl_prcp"][0]) > 0  # the paired variant exercised the KL path


def test_pack_by_tokens_first_fit_decreasing():
    from megatron_papo.actor import pack_by_tokens

    lengths = [5, 40, 7, 40, 12, 3, 90, 20]
    bins = pack_by_tokens(list(range(8)), lengths, 80)
    assert sorted(r for b in bins for r in b) == list(range(8))
    assert [6] in bins  # longer than the budget: alone
    for b in bins:
        assert b == sorted(b) and (len(b) == 1 or sum(lengths[r] for r in b) <= 80)
    assert len(bins) == 3  # 90 | 40+40 | 20+12+7+5+3 (= 47)
    with pytest.raises(ValueError, match="positive"):
        pack_by_tokens([0], [1], 0)
