"""Qwen2.5-VL on mcore vs transformers at TP=1, TP=2 (+SP), PP=2 and TP=2xPP=2 (gloo, CPU, fp32).

Every layout: log-prob parity <= 1e-4 with transformers on a batch with two images of different
sizes in one sample, a text-only sample and padding, for tied (2 layers) and untied (4 layers)
checkpoints with GQA; the HF→mcore→HF round trip is bit-exact with exactly the checkpoint's names.
Gradients of a log-prob loss at TP=2 and PP=2 equal TP=1 to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = "tests.distributed.model_workers:check_layout"
ATOL_LOGP = 1e-4
ATOL_GRAD = 1e-5


def _check(results: list[dict], tokens_min: int = 100) -> None:
    for rank_result in results:
        for tag, res in rank_result.items():
            assert res["tokens"] >= tokens_min, (tag, res)
            assert res["max_abs_logprob_diff"] <= ATOL_LOGP, (tag, res)
            assert res["missing_names"] == [] and res["extra_names"] == [], (tag, res)
            assert res["not_bit_exact"] == [], (tag, res)


@pytest.fixture(scope="module")
def grads_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model_grads")


@pytest.fixture(scope="module")
def dirs(tiny_model_dir, tiny_untied_dir):
    return [str(tiny_model_dir), str(tiny_untied_dir)]


@pytest.fixture(scope="module")
def tp1(dirs, grads_dir):
    """The TP=1 reference run (parity vs transformers + reference gradients)."""
    return run_distributed(WORKER, 1, {"hf_dirs": dirs, "tp": 1, "pp": 1, "padding_side": "left",
                                       "grads_dir": str(grads_dir)})


def _compare_grads(grads_dir, tp: int, pp: int, sp: int) -> None:
    for ref_path in sorted(grads_dir.glob("*_tp1_pp1_sp0.pt")):
        tag = ref_path.name.split("_tp1_")[0]
        ref = torch.load(ref_path)
        got = torch.load(grads_dir / f"{tag}_tp{tp}_pp{pp}_sp{sp}.pt")
        assert set(ref) == set(got)
        assert any(float(g.abs().max()) > 0 for g in ref.values())
        bad = {n: float((ref[n] - got[n]).abs().max()) for n in ref if not torch.allclose(ref[n], got[n], rtol=0,
                                                                                        atol=ATOL_GRAD)}
        assert not bad, f"{tag} tp{tp} pp{pp} sp{sp}: grads differ from TP=1: {bad}"


def test_tp1_parity_and_roundtrip(tp1):
    _check(tp1)


def test_tp2_parity_roundtrip_grads(tp1, dirs, grads_dir):
    _check(run_distributed(WORKER, 2, {"hf_dirs": dirs, "tp": 2, "pp": 1, "padding_side": "left",
                                       "grads_dir": str(grads_dir)}))
    _compare_grads(grads_dir, 2, 1, 0)


def test_tp2_sequence_parallel(tp1, dirs, grads_dir):
    _check(run_distributed(WORKER, 2, {"hf_dirs": dirs, "tp": 2, "pp": 1, "sp": True, "padding_side": "left",
                                       "grads_dir": str(grads_dir)}))
    _compare_grads(grads_dir, 2, 1, 1)


def test_pp2_parity_roundtrip_grads(tp1, dirs, grads_dir):
    _check(run_distributed(WORKER, 2, {"hf_dirs": dirs, "tp": 1, "pp": 2, "padding_side": "left",
                                       "grads_dir": str(grads_dir)}))
    _compare_grads(grads_dir, 1, 2, 0)


def test_tp2_pp2_parity_roundtrip(tiny_untied_dir, tiny_model_dir):
    _check(run_distributed(WORKER, 4, {"hf_dirs": [str(tiny_model_dir), str(tiny_untied_dir)], "tp": 2, "pp": 2,
                                       "padding_side": "right"}),
           tokens_min=100)

