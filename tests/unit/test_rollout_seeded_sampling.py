"""Seeded sampling on SGLang's CPU engine (``rollout/cpu_shim/seeded.py``): the hash equals MurmurHash3, and
SGLang's own seeded samplers, run with it, draw from the right distribution independently of the batch."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import torch

from megatron_papo.rollout.cpu_shim import SHIM_DIR
from megatron_papo.rollout.cpu_shim.seeded import murmur_hash32_torch
from tests.harness import REPO


def murmur3_x86_32(key: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 written from the published algorithm (whole 4-byte blocks only)."""
    h = seed
    for i in range(0, len(key), 4):
        k = struct.unpack("<I", key[i:i + 4])[0]
        k = (k * 0xCC9E2D51) & 0xFFFFFFFF
        k = ((k << 15) | (k >> 17)) & 0xFFFFFFFF
        k = (k * 0x1B873593) & 0xFFFFFFFF
        h ^= k
        h = ((h << 13) | (h >> 19)) & 0xFFFFFFFF
        h = (h * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= len(key)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_reference_hash_reproduces_published_vectors():
    assert murmur3_x86_32(b"") == 0
    assert murmur3_x86_32(b"abcd", 0x9747B28C) == 0xF0478627  # MurmurHash3 test vector


def test_torch_hash_equals_murmur3_of_seed_position_token():
    seeds = torch.tensor([0, 1, 2**31 - 2, -5, 2**62 + 12345, -(2**63)])
    pos = torch.tensor([0, 7, 123456, 3, 2**33 + 9, 2**32 - 1])
    cols = torch.arange(0, 152064, 4099)  # up to a Qwen2.5-VL-sized vocabulary
    got = murmur_hash32_torch(seeds, pos, cols)
    assert got.shape == (6, cols.numel()) and int(got.min()) >= 0 and int(got.max()) < 2**32
    for i, (s, p) in enumerate(zip(seeds.tolist(), pos.tolist())):
        for j, c in enumerate(cols.tolist()):
            key = struct.pack("<Q", s & (2**64 - 1)) + struct.pack("<I", p & 0xFFFFFFFF) + struct.pack("<I", c)
            assert int(got[i, j]) == murmur3_x86_32(key), (s, p, c)


PROBE = r"""
import sys, torch
sys.path.insert(0, {shim!r})
from megatron_papo.rollout.cpu_shim.seeded import patch_sglang
assert patch_sglang()
from sglang.srt.layers import sampler

N = 20000
p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
probs = p.repeat(N, 1)
seeds = torch.arange(N, dtype=torch.int64) * 7919 + 17
pos = torch.full((N,), 11, dtype=torch.int64)
tok = sampler.sampling_from_probs_torch(probs.clone(), sampling_seed=seeds, positions=pos).long()
counts = torch.bincount(tok, minlength=5).double()
assert counts[4] == 0, counts  # probability 0 is never drawn
exp = p[:4].double() * N
chi2 = float(((counts[:4] - exp) ** 2 / exp).sum())
assert chi2 < 16.27, (chi2, counts.tolist())  # df=3, p=0.001
# the same (seed, position) draws the same token alone and in any batch order
perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:50]
alone = torch.stack([sampler.sampling_from_probs_torch(probs[i:i+1].clone(), sampling_seed=seeds[i:i+1],
                     positions=pos[i:i+1]) for i in perm]).view(-1).long()
assert torch.equal(alone, tok[perm])
moved = sampler.sampling_from_probs_torch(probs.clone(), sampling_seed=seeds, positions=pos + 1).long()
assert (moved != tok).any()  # the position is part of the key
# top-p path (pytorch sampling backend): the nucleus of 0.7 keeps tokens 0 and 1 (0.5 + 0.25 >= 0.7)
topk = torch.full((N,), 5, dtype=torch.int32)
tok2 = sampler.top_k_top_p_min_p_sampling_from_probs_torch(probs.clone(), topk, torch.full((N,), 0.7), torch.zeros(N),
                                                            False, seeds, pos).long()
c2 = torch.bincount(tok2, minlength=5).double()
assert c2[2:].sum() == 0, c2
exp2 = N * torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
chi2b = float(((c2[:2] - exp2) ** 2 / exp2).sum())
assert chi2b < 10.83, (chi2b, c2.tolist())  # df=1, p=0.001
print("ok", chi2, chi2b)
"""


def test_sglang_seeded_samplers_draw_the_distribution_and_ignore_the_batch():
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE.format(shim=SHIM_DIR)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=REPO)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
