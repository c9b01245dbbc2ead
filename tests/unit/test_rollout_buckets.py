"""Weight-transport bucketing: per-dtype buckets within the size, exact flatten/unflatten round trip."""

from __future__ import annotations

import torch

from megatron_papo.rollout.weight_transport import bucketize, flatten_bucket, unflatten_bucket


def _pairs():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(9):
        dt = torch.bfloat16 if i % 3 == 2 else torch.float32
        out.append((f"w{i}", torch.randn(100 + i, 7, generator=g).to(dt)))
    out.append(("big", torch.randn(2000, 10, generator=g)))  # larger than a bucket: alone
    return out


def test_buckets_group_dtypes_and_respect_size():
    pairs = _pairs()
    limit = 8 * 1024
    buckets = list(bucketize(iter(pairs), limit))
    seen = [n for b in buckets for n, _ in b]
    assert sorted(seen) == sorted(n for n, _ in pairs)
    for b in buckets:
        assert len({t.dtype for _, t in b}) == 1
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size <= limit or len(b) == 1
    assert [n for b in buckets for n, _ in b if n == "big"] == ["big"]
    assert list(bucketize(iter(pairs), limit)) and [len(b) for b in buckets] == [len(b) for b in bucketize(iter(pairs), limit)]


def test_ready_made_buckets_pass_through():
    pairs = _pairs()[:3]
    assert list(bucketize([pairs[:2], pairs[2:]], 1)) == [pairs[:2], pairs[2:]]


def test_flatten_round_trip_is_exact():
    bucket = [(n, t) for n, t in _pairs() if t.dtype == torch.float32][:4]
    flat, meta = flatten_bucket(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * 4 for _, t in bucket)
    for (n, t), (m, u) in zip(bucket, unflatten_bucket(flat, meta)):
        assert n == m and u.dtype == t.dtype and torch.equal(u, t)


def test_flatten_into_shared_memory():
    bucket = [(n, t) for n, t in _pairs() if t.dtype == torch.bfloat16]
    flat, meta = flatten_bucket(bucket, "cpu", shared=True)
    assert flat.is_shared()
    for (n, t), (m, u) in zip(bucket, unflatten_bucket(flat, meta)):
        assert n == m and torch.equal(u, t)
