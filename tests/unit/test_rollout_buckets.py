"""Weight-transport bucketing: per-dtype buckets within the size, exact flatten/unflatten round trip; the order of a
sync's engine calls (the first bucket built while the engine opens its bracket, the bracket closed on failure)."""

from __future__ import annotations

import pytest
import torch

from megatron_papo.rollout.base import EngineError
from megatron_papo.rollout.sglang_engine import SGLangEngine
from megatron_papo.rollout.weight_transport import bucketize, flatten_bucket, push_buckets, unflatten_bucket


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


class _BracketEngine:
    """What ``push_buckets`` uses of an engine (``_send``/``_recv``/``_call``/``_check``/``_proc``), recording every
    message in order into a log shared with the bucket source; ``fail`` names a call that answers with an error."""

    shared_flat = False
    _proc = object()

    def __init__(self, log: list, fail: str = "") -> None:
        self.log, self.fail, self.pending = log, fail, []

    def _send(self, method: str, **kw) -> None:
        self.log.append(("send", method))
        self.pending.append(method)

    def _recv(self, method: str, timeout=None):  # the answer to the oldest call in flight (``method`` names it)
        method = self.pending.pop(0)
        self.log.append(("recv", method))
        if method == self.fail:
            raise EngineError(f"SGLang {method} failed in the engine")
        return (True, "ok")

    def _call(self, method: str, timeout=None, **kw):
        self._send(method, **kw)
        return self._recv(method, timeout)

    _check = staticmethod(SGLangEngine._check)
    _running = SGLangEngine._running


def _source(log: list, buckets: list, fail_at: int = -1):
    for i, b in enumerate(buckets):
        if i == fail_at:
            raise RuntimeError("gather failed")
        log.append(("built", i))
        yield b


def test_first_bucket_is_built_while_the_engine_opens_its_bracket():
    log: list = []
    pairs = _pairs()[:4]
    stats = push_buckets(_BracketEngine(log), _source(log, [pairs[:2], pairs[2:]]), "tensor", 1 << 20)
    assert log == [("send", "begin_update"), ("built", 0), ("recv", "begin_update"),
                   ("send", "update_flat"), ("recv", "update_flat"), ("built", 1), ("send", "update_flat"),
                   ("recv", "update_flat"), ("send", "end_update"), ("recv", "end_update"),
                   ("send", "flush_cache"), ("recv", "flush_cache")]
    assert stats["tensors"] == 4


def test_a_failing_bucket_source_still_closes_the_bracket():
    log: list = []
    with pytest.raises(RuntimeError, match="gather failed"):
        push_buckets(_BracketEngine(log), _source(log, [_pairs()[:2]], fail_at=0), "tensor", 1 << 20)
    assert log == [("send", "begin_update"), ("recv", "begin_update"), ("send", "end_update"), ("recv", "end_update")]


def test_a_failed_begin_pushes_nothing_and_closes_nothing():
    log: list = []
    with pytest.raises(EngineError, match="begin_update failed"):
        push_buckets(_BracketEngine(log, fail="begin_update"), _source(log, [_pairs()[:2]]), "tensor", 1 << 20)
    assert log == [("send", "begin_update"), ("built", 0), ("recv", "begin_update")]


def test_an_external_server_gets_its_bracket_closed():
    """An external server (``ExternalServerEngine``: no process of ours, ``_proc`` None) still gets end_update."""
    from megatron_papo.rollout.sglang_server import ExternalServerEngine

    class External(_BracketEngine):
        _proc, _attached = None, True
        _running = ExternalServerEngine._running

    log: list = []
    eng = External(log)
    push_buckets(eng, _source(log, [_pairs()[:2]]), "tensor", 1 << 20)
    assert [m for m in log if m[0] == "send"] == [("send", "begin_update"), ("send", "update_flat"),
                                                   ("send", "end_update"), ("send", "flush_cache")]


def test_fleet_bracket_reads_every_answer_and_closes_every_bracket_that_opened():
    """Several engines on one rank (``fleet_sync._bracket``): engine 0's begin fails. Engine 1's answer is still
    read, its bracket (opened) is closed, nothing is left unread on either pipe, and engine 0's error is raised."""
    from megatron_papo.rollout import fleet_sync

    logs: list[list] = [[], []]
    engines = [_BracketEngine(logs[0], fail="begin_update"), _BracketEngine(logs[1])]
    pushed: list = []
    with pytest.raises(EngineError, match="begin_update failed"):
        fleet_sync._bracket(engines, lambda: pushed.append(1))
    assert pushed == [] and all(not e.pending for e in engines)
    assert logs[0] == [("send", "begin_update"), ("recv", "begin_update")]
    assert logs[1] == [("send", "begin_update"), ("recv", "begin_update"), ("send", "end_update"), ("recv", "end_update")]


def test_fleet_update_failing_on_one_engine_still_closes_both():
    from megatron_papo.rollout import fleet_sync

    logs: list[list] = [[], []]
    engines = [_BracketEngine(logs[0], fail="update_flat"), _BracketEngine(logs[1])]  # engine 1 answers after the failure
    with pytest.raises(EngineError, match="update_flat failed"):
        fleet_sync._bracket(engines, lambda: fleet_sync._all(engines, "update_flat", "update_flat"))
    assert all(not e.pending for e in engines)
    for log in logs:
        assert log[-2:] == [("send", "end_update"), ("recv", "end_update")]


def test_a_failed_broadcast_leaves_no_answer_for_the_next_call():
    """``transport=distributed``: the broadcast of a bucket fails (a timeout, a dead peer); the engine's answer to
    ``update_distributed`` is read there, so the bracket's ``end_update`` reads its own answer."""
    from megatron_papo.rollout.weight_transport import _push_distributed

    class Work:
        def wait(self):
            raise RuntimeError("broadcast timed out")

    class Group:
        def broadcast(self, tensors, opts):
            return Work()

    log: list = []
    eng = _BracketEngine(log)
    eng._update_group, eng.device, eng.engine_kwargs = (Group(), "g"), "cpu", {}
    with pytest.raises(RuntimeError, match="broadcast timed out"):
        _push_distributed(eng, _pairs()[:2])
    assert not eng.pending and log == [("send", "update_distributed"), ("recv", "update_distributed")]
