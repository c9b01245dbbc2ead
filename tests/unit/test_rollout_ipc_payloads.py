"""Weight-transport payloads for an engine with TP >= 2 (issue 12 item 6), without an engine.

SGLang 0.5.23's TP worker ``i`` deserialises only ``serialized_named_tensors[i]`` (``managers/tp_worker.py``
``deserialize_own_rank``). A serialisation may be consumed once: a CPU shared-memory tensor pickles as a
``DupFd`` that multiprocessing's resource sharer hands out once; a CUDA-IPC handle carries one producer-side
reference count. These tests deserialise each payload in its own spawned process, as the TP ranks do, and
check that the trainer serialises CUDA buckets once per rank under SGLang's device-by-UUID reductions.
"""

from __future__ import annotations

import base64
import multiprocessing as mp
import pickle
from types import SimpleNamespace

import pytest
import torch

from megatron_papo.rollout.weight_transport import flatten_bucket


def _rank_main(payload: str, q) -> None:
    """A stand-in TP rank: deserialise one payload in a process of its own."""
    try:
        obj = pickle.loads(base64.b64decode(payload))
        q.put(("ok", obj["flattened_tensor"].clone().numpy().tobytes()))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("err", repr(e)))


def _consume_each_in_its_own_process(payloads: list[str]) -> list[tuple[str, object]]:
    ctx = mp.get_context("fork")  # fast; the handles are fetched from this process exactly as a spawned rank would
    q = ctx.Queue()
    out = []
    for p in payloads:  # one after the other, as ranks may load in any order
        proc = ctx.Process(target=_rank_main, args=(p, q))
        proc.start()
        out.append(q.get(timeout=120))
        proc.join(60)
    return out


def _bucket() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(4, 3, generator=g)), ("b.bias", torch.randn(5, generator=g))]


def test_cpu_flat_bucket_one_serialisation_per_rank(monkeypatch):
    from megatron_papo.rollout import _sglang_host

    flat, meta = flatten_bucket(_bucket(), "cpu", shared=True)
    got: dict[str, list] = {}
    monkeypatch.setattr(_sglang_host, "_update_serialized",
                        lambda engine, payloads, load_format, flush_cache: got.setdefault("payloads", payloads))
    _sglang_host._update_flat(SimpleNamespace(server_args=SimpleNamespace(tp_size=2)), flat, meta, False)
    payloads = got["payloads"]
    assert len(payloads) == 2
    results = _consume_each_in_its_own_process(payloads)
    assert [r[0] for r in results] == ["ok", "ok"], results  # a repeated payload: the second rank gets EOFError
    assert payloads[0] != payloads[1], "one distinct serialisation per TP rank"
    assert all(r[1] == flat.numpy().tobytes() for r in results)


def test_server_flat_payload_one_serialisation_per_rank(tiny_model_dir):
    from megatron_papo.rollout.sglang_server import SGLangServerEngine

    srv = SGLangServerEngine(str(tiny_model_dir), device="cpu", tp_size=2)  # not started: only the payload is built
    flat, meta = flatten_bucket(_bucket(), "cpu", shared=False)
    payloads = srv._flat_payload(flat, meta, False)["serialized_named_tensors"]
    assert len(payloads) == 2  # by shm file name: equal bytes, but each pickling took one reference for its rank
    results = _consume_each_in_its_own_process(payloads)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert all(r[1] == srv._keepalive.numpy().tobytes() for r in results)


class _LooksCuda(torch.Tensor):
    """A CPU tensor that answers ``is_cuda`` (routes ``_push_tensor`` to its CUDA-IPC branch on a CPU machine)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


@pytest.mark.parametrize("tp", [1, 3])
def test_cuda_bucket_serialised_per_rank_under_uuid_reductions(monkeypatch, tp):
    from multiprocessing.reduction import ForkingPickler

    from sglang.srt.utils import MultiprocessingSerializer, patch_torch
    from torch.multiprocessing import reductions

    from megatron_papo.rollout.weight_transport import _push_tensor

    assert not hasattr(reductions, "_reduce_tensor_original"), "the reductions patch leaked in from elsewhere"
    calls: list[dict] = []

    def spy(obj, output_str=False):  # CPU stand-ins cannot be pickled under the CUDA-only patch: record instead
        calls.append({"patched": reductions.reduce_tensor is patch_torch._reduce_tensor_modified,
                      "registered": ForkingPickler._extra_reducers.get(torch.Tensor) is patch_torch._reduce_tensor_modified,
                      "flat": obj["flattened_tensor"], "names": [m.name for m in obj["metadata"]]})
        return f"payload-{len(calls)}"

    monkeypatch.setattr(MultiprocessingSerializer, "serialize", staticmethod(spy))
    sent: dict = {}

    def _call(method, **kw):
        sent[method] = kw
        return (True, "Success")

    engine = SimpleNamespace(engine_kwargs={"tp_size": tp}, _call=_call, _check=lambda res, what, allow_none=False: res)
    bucket = [(n, t.as_subclass(_LooksCuda)) for n, t in _bucket()]
    _push_tensor(engine, bucket)
    payloads = sent["update_serialized"]["payloads"]
    assert len(calls) == tp and payloads == [f"payload-{i + 1}" for i in range(tp)], "one serialisation per TP rank"
    assert all(c["patched"] and c["registered"] for c in calls), "SGLang's device-by-UUID reductions must be on"
    assert all(c["names"] == ["a.weight", "b.bias"] for c in calls)
    expect = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in _bucket()])
    assert torch.equal(calls[0]["flat"].as_subclass(torch.Tensor).view(torch.uint8).reshape(-1), expect)
    assert sent["update_serialized"]["load_format"] == "flattened_bucket"
    # undone afterwards: this process must still pickle CPU tensors for its other pipes
    assert reductions.reduce_tensor is not patch_torch._reduce_tensor_modified
    assert not hasattr(reductions, "_reduce_tensor_original")
    ForkingPickler.dumps(torch.ones(2))
