"""Batch-invariant numerics of SGLang's CPU engine (``rollout/cpu_shim/batch_invariant.py``): a row's linear
output, an image's vision attention and a token's lm-head logits do not depend on what shares their batch, and
they still equal the plain computation (float64 reference, SGLang's own masked attention) to fp32 rounding.
The engine-level check (the same seeded request gives bit-identical log-probs alone, in another batch and in
another order) is ``tests/integration/test_sglang_engine.py::test_seeded_samples_repeat_and_do_not_depend_on_the_batch``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_papo.rollout.cpu_shim import SHIM_DIR
from megatron_papo.rollout.cpu_shim.batch_invariant import invariant_linear
from tests.harness import REPO

# (in, out) of the tiny default's layers (text 128/256/512 vocab, vision 64/128/1176 patch) and a wider one
SHAPES = [(128, 256), (256, 128), (128, 512), (64, 192), (1176, 64), (512, 1024)]
BATCHES = [1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 64, 65, 130, 257]


@pytest.mark.parametrize("k,n", SHAPES)
def test_each_row_is_the_same_computation_in_any_batch(k, n):
    """Row i alone, inside batches of every size, at another position and next to other rows: bit for bit.
    (Plain ``F.linear`` on MKL fails this from 2 rows up: the kernel depends on the row count.)"""
    g = torch.Generator().manual_seed(k * 7 + n)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(max(BATCHES), k, generator=g)
    alone = [invariant_linear(x[i:i + 1], w, b) for i in range(x.shape[0])]
    for size in BATCHES:
        y = invariant_linear(x[:size], w, b)
        for i in range(size):
            assert torch.equal(y[i:i + 1], alone[i]), (size, i)
    shuffled = torch.randperm(x.shape[0], generator=g)
    y = invariant_linear(x[shuffled], w, b)
    for pos, i in enumerate(shuffled.tolist()):
        assert torch.equal(y[pos:pos + 1], alone[i])
    other = x.clone()
    other[1:] = torch.randn_like(other[1:])
    assert torch.equal(invariant_linear(other, w, b)[:1], alone[0])


@pytest.mark.parametrize("k,n", SHAPES)
def test_rows_equal_a_float64_reference(k, n):
    g = torch.Generator().manual_seed(k + n)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(3, 5, k, generator=g)
    ref = x.double() @ w.double().T + b.double()
    got = invariant_linear(x, w, b)
    assert got.shape == (3, 5, n) and got.dtype == torch.float32
    scale = x.double().abs() @ w.double().abs().T + b.double().abs()  # error bound grows with sum |x_i w_i|
    assert float(((got.double() - ref).abs() / scale).max()) < 4 * k * torch.finfo(torch.float32).eps
    assert torch.equal(invariant_linear(x, w), invariant_linear(x, w, torch.zeros(n)))


def test_other_devices_and_dtypes_go_to_torch():
    w = torch.randn(8, 4, device="meta")
    assert invariant_linear(torch.randn(3, 4, device="meta"), w).shape == (3, 8)
    empty = invariant_linear(torch.randn(0, 4), torch.randn(8, 4))
    assert empty.shape == (0, 8)


PROBE = r"""
import sys, torch
sys.path.insert(0, {shim!r})
from sglang.srt.layers.attention.vision import VisionSdpaAttention
from sglang.srt.layers.logits_processor import LogitsProcessor
masked = VisionSdpaAttention.forward
from megatron_papo.rollout.cpu_shim import batch_invariant
assert batch_invariant.patch_sglang() and not batch_invariant.patch_sglang()
assert torch.nn.functional.linear is batch_invariant.invariant_linear

# vision attention: per cu_seqlens segment == SGLang's block-diagonal masked SDPA; an image alone == in a batch
attn = VisionSdpaAttention(head_dim=16, num_heads=4, num_kv_heads=4, flatten_batch=True)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(100, 4, 16, generator=g) for _ in range(3))
cu = torch.tensor([0, 16, 16, 52, 100], dtype=torch.int32)  # an empty segment too
got = attn.forward(q, k, v, bsz=1, cu_seqlens=cu)
ref = masked(attn, q, k, v, bsz=1, cu_seqlens=cu)
assert got.shape == ref.shape == (100, 4, 16)
assert float((got - ref).abs().max()) < 1e-6, float((got - ref).abs().max())
alone = attn.forward(q[16:52], k[16:52], v[16:52], bsz=1, cu_seqlens=torch.tensor([0, 36], dtype=torch.int32))
assert torch.equal(alone, got[16:52])
assert float((masked(attn, q[16:52], k[16:52], v[16:52], bsz=1, cu_seqlens=torch.tensor([0, 36], dtype=torch.int32))
              - alone).abs().max()) < 1e-6
# a 256-patch image among 2000 patches (where the masked kernel's blocking changes its result by ~1e-7)
q, k, v = (torch.randn(2000, 4, 16, generator=g) for _ in range(3))
big = attn.forward(q, k, v, bsz=1, cu_seqlens=torch.tensor([0, 1000, 1256, 2000], dtype=torch.int32))
one = attn.forward(q[1000:1256], k[1000:1256], v[1000:1256], bsz=1, cu_seqlens=torch.tensor([0, 256], dtype=torch.int32))
assert torch.equal(one, big[1000:1256])

# lm head of a plain (tied embedding) weight: each token's logits alone == in a batch == hidden @ W.T (fp32)
class Head:
    quant_method = None
    def __init__(self, w): self.weight = w
class Proc:
    use_fp32_lm_head = False
w = torch.randn(512, 128, generator=g)
h = torch.randn(37, 128, generator=g)
logits = LogitsProcessor._compute_lm_head(Proc(), h, Head(w))
assert float((logits.double() - h.double() @ w.double().T).abs().max()) < 1e-4
assert all(torch.equal(LogitsProcessor._compute_lm_head(Proc(), h[i:i + 1], Head(w)), logits[i:i + 1]) for i in range(37))
print("OK")
"""


def test_patched_sglang_vision_attention_and_lm_head_are_batch_invariant():
    """In a fresh process (the patch changes process globals, as in an SGLang scheduler)."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(shim=SHIM_DIR)], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "SGLANG_USE_CPU_ENGINE": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
