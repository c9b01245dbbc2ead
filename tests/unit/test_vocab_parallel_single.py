"""``token_stats`` in one process (no group): every case against the float64 reference, plus API contracts."""

from __future__ import annotations

import pytest
import torch

from megatron_papo.ops import IGNORE_INDEX, token_stats
from tests.distributed.vocab_parallel_workers import CASES, CHUNK_PAIRS, OUTPUTS, error_ratios, make_case, run_local


def _run(name: str) -> dict:
    res = run_local(make_case(name), None, 0, 1)
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in res.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    got = _run(name)
    case = CASES[name]
    assert got["returned"] == sorted(case.outputs)
    assert got["dtypes"] == ["torch.float32"]
    assert got["inputs_unchanged"]
    ratios = error_ratios(name, got)
    assert all(r <= 1.0 for r in ratios.values()), ratios
    for k in case.outputs:
        assert torch.isfinite(got[k]).all(), k
    assert torch.isfinite(got["grad_x"]).all()
    if case.ref_grad and got["grad_xr"] is not None:
        assert torch.isfinite(got["grad_xr"]).all()
    else:
        assert got["grad_xr"] is None  # no gradient reaches the masked view unless asked for
        assert not got["ref_out_requires_grad"]


@pytest.mark.parametrize("whole,chunked", CHUNK_PAIRS)
def test_chunked_equals_unchunked(whole, chunked):
    a, b = _run(whole), _run(chunked)
    for k in (*CASES[whole].outputs, "grad_x", "grad_xr"):
        diff = (a[k] - b[k]).abs() / b[k].abs().clamp_min(1.0)
        assert float(diff.max()) <= 1e-7, (k, float(diff.max()))


def test_ignored_tokens_are_zero_with_zero_grad():
    got = _run("bs")
    labels = make_case("bs")["labels"]
    ignored = labels == IGNORE_INDEX
    assert ignored.sum() == 2
    for k in OUTPUTS:
        assert torch.all(got[k][ignored] == 0), k
    assert torch.all(got["grad_x"][ignored] == 0) and torch.all(got["grad_xr"][ignored] == 0)


def test_bf16_large_logits_finite():
    x = torch.full((4, 64), -3e38).to(torch.bfloat16)
    x[:, 3] = 3e38
    x[1] = 1e4
    x.requires_grad_(True)
    xr = x.detach().flip(-1).clone().requires_grad_(True)
    labels = torch.tensor([3, 4, 60, IGNORE_INDEX])
    st = token_stats(x, labels, None, ref_logits=xr, entropy=True, ref_entropy=True, kl=True, ref_requires_grad=True)
    outs = [st.logprob, st.ref_logprob, st.entropy, st.ref_entropy]
    assert all(torch.isfinite(o).all() for o in outs)
    (sum(o.sum() for o in outs)).backward()
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(xr.grad.float()).all()
    assert x.grad.dtype == torch.bfloat16
    assert float(st.logprob[0]) == 0.0 and abs(float(st.logprob[1]) + torch.log(torch.tensor(64.0))) < 1e-6


def test_no_ref_fields_are_none():
    st = token_stats(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), None)
    assert st.logprob.shape == (2, 3) and st.ref_logprob is None and st.entropy is None and st.kl is None


@pytest.mark.parametrize("kwargs,match", [
    ({"labels": torch.zeros(3, dtype=torch.long)}, "labels shape"),
    ({"labels": torch.full((2, 3), 8)}, "outside"),
    ({"labels": torch.zeros(2, 3)}, "int64"),
    ({"ref_logits": torch.randn(2, 3, 4)}, "must match"),
    ({"kl": True}, "need ref_logits"),
    ({"temperature": 0.0}, "temperature"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_input_one_line_error(kwargs, match):
    args = {"logits": torch.randn(2, 3, 8), "labels": torch.zeros(2, 3, dtype=torch.long), **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        token_stats(args.pop("logits"), args.pop("labels"), None, **args)
    assert "\n" not in str(info.value)


def test_cpu_block_cap_equals_unchunked(monkeypatch):
    """The CPU cache-sized blocking (forced down to 3 rows here) gives the unchunked results."""
    import megatron_papo.ops.vocab_parallel as vp

    whole = _run("extreme")
    monkeypatch.setattr(vp, "_CPU_BLOCK_BYTES", 4 * 48 * 3)
    assert vp._block_rows(20, 48, None, torch.device("cpu")) == 3
    blocked = _run("extreme")
    for k in (*OUTPUTS, "grad_x", "grad_xr"):
        diff = (whole[k] - blocked[k]).abs() / blocked[k].abs().clamp_min(1.0)
        assert float(diff.max()) <= 1e-7, (k, float(diff.max()))


def test_minus_inf_columns_equal_removed_columns():
    """Masking vocab entries to -inf (e.g. never-sampled placeholder tokens) equals deleting those columns."""
    g = torch.Generator().manual_seed(3)
    x, xr = torch.randn(6, 40, generator=g) * 2, torch.randn(6, 40, generator=g) * 2
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 7, 8, 39]] = False
    labels = torch.tensor([1, 5, 20, 38, IGNORE_INDEX, 9])
    w = torch.randn(5, 6, generator=g)

    def run(a, b, lab):
        a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        st = token_stats(a, lab, None, ref_logits=b, temperature=0.8, entropy=True, ref_entropy=True, kl=True,
                         ref_requires_grad=True)
        outs = [getattr(st, k) for k in OUTPUTS]
        sum((wi * o).sum() for wi, o in zip(w, outs)).backward()
        return outs, a.grad, b.grad

    masked = run(x.masked_fill(~keep, float("-inf")), xr.masked_fill(~keep, float("-inf")), labels)
    remap = torch.cumsum(keep.long(), 0) - 1
    removed = run(x[:, keep], xr[:, keep], torch.where(labels >= 0, remap[labels.clamp(min=0)], labels))
    for a, b in zip(masked[0], removed[0]):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for ga, gb in zip(masked[1:], removed[1:]):
        assert torch.all(ga[:, ~keep] == 0) and torch.allclose(ga[:, keep], gb, rtol=1e-6, atol=1e-7)
