"""CPU engines' tokenizer manager does a rollout's per-sample requests' shared work once
(``rollout/cpu_shim/dispatch.py``).

* The Qwen-VL prompt template of a token-id prompt is built once per (ids, image grid), least recently used out,
  string prompts untouched.
* A pre-tokenized ``n=1`` batch reaches the scheduler in chunks of ``SEND_CHUNK`` requests, in order, each request's
  waiter built before the message that carries it leaves (a request may finish, and leave ``rid_to_state``, as
  soon as it is sent); any other batch goes to SGLang's own method.
* ``install`` changes nothing without ``SGLANG_USE_CPU_ENGINE=1`` and wraps both methods with it (fresh
  interpreter: the patch is process-wide).

Engines generating under the patch (tokens equal transformers, seeds reproducible, 1 engine = 2 engines):
``tests/integration``; the outputs' digest in ``tools/bench/rollout_fleet.py`` is unchanged by it.
"""

from __future__ import annotations

from tests.harness import run_probe


def test_token_prompt_templates_are_built_once_per_prompt_and_grid():
    from megatron_papo.rollout.cpu_shim.dispatch import memoize_token_templates

    calls = []

    def build(self, text, grid):
        calls.append((tuple(text) if not isinstance(text, str) else text, grid))
        return (tuple(text), grid, object())

    memo = memoize_token_templates(build, maxsize=2)
    proc, other = type("P", (), {})(), type("P", (), {})()
    a = memo(proc, [1, 2, 3], ((1, 2, 2),))
    assert memo(proc, [1, 2, 3], ((1, 2, 2),)) is a  # the copies of one prompt: one build
    assert memo(proc, (1, 2, 3), ((1, 2, 2),)) is a  # list or tuple of the same ids
    assert memo(proc, [1, 2, 3], ((1, 4, 4),)) is not a  # another image grid
    assert memo(other, [1, 2, 3], ((1, 2, 2),)) is not a  # per processor
    memo(proc, "text <image>", ((1, 2, 2),))
    memo(proc, "text <image>", ((1, 2, 2),))  # strings: SGLang's own lru_cache sits in front; not cached here
    assert calls.count(("text <image>", ((1, 2, 2),))) == 2
    memo(proc, [9], ((1, 2, 2),))  # a third entry evicts the least recently used ([1, 2, 3] with grid 2x2)
    assert memo(proc, [1, 2, 3], ((1, 4, 4),)) is memo(proc, [1, 2, 3], ((1, 4, 4),))  # still cached
    memo(proc, [1, 2, 3], ((1, 2, 2),))  # built again
    assert calls.count(((1, 2, 3), ((1, 2, 2),))) == 3  # proc twice, other once
    assert len(calls) == 7


PROBE = r"""
import asyncio
import os
from types import SimpleNamespace

from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor

from megatron_papo.rollout.cpu_shim import dispatch

original = (TokenizerManager.__dict__["_handle_batch_request"], QwenVLImageProcessor.__dict__["_build_image_prompt_template"])
os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
print(dispatch.install(), TokenizerManager.__dict__["_handle_batch_request"] is original[0])
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
print(dispatch.install(), dispatch.install(), TokenizerManager._handle_batch_request.__wrapped__ is original[0],
      QwenVLImageProcessor._build_image_prompt_template.__wrapped__ is original[1])


def batch(n, **kw):
    obj = GenerateReqInput(input_ids=[[1, 2, i] for i in range(n)], image_data=[["img"]] * n,
                           sampling_params=[{"sampling_seed": i} for i in range(n)], **kw)
    obj.normalize_batch_and_arguments()
    return obj


class FakeManager:
    # what the wrapper uses of SGLang's tokenizer manager; a sent request finishes at once and leaves rid_to_state
    _collect_batch_responses = TokenizerManager._collect_batch_responses

    def __init__(self, obj):
        self.rid_to_state = {obj[i].rid: SimpleNamespace(prompt_token_ids=None) for i in range(obj.batch_size)}
        self.events = []

    async def _tokenize_one_request(self, sub):
        await asyncio.sleep(0)  # SGLang yields here (image preparation); the event loop may deliver outputs
        self.events.append(("tokenize", sub.rid))
        return SimpleNamespace(rid=sub.rid, input_ids=list(sub.input_ids))

    def _wait_one_response(self, sub, request):
        state = self.rid_to_state[sub.rid]  # SGLang's waiter reads the state when it is built
        self.events.append(("wait", sub.rid))

        async def gen():
            yield {"rid": sub.rid, "state": state}
        return gen()

    async def _send_batch_request(self, objs):
        self.events.append(("send", [o.rid for o in objs]))
        for o in objs:
            del self.rid_to_state[o.rid]


async def collect(tm, obj):
    return [out async for out in TokenizerManager._handle_batch_request(tm, obj, None, {})]


obj = batch(70)
tm = FakeManager(obj)
(outs,) = asyncio.run(collect(tm, obj))
rids = [obj[i].rid for i in range(70)]
sends = [e[1] for e in tm.events if e[0] == "send"]
waited = {}
for k, e in enumerate(tm.events):
    if e[0] == "wait":
        waited[e[1]] = k
first_send = {r: k for k, e in enumerate(tm.events) if e[0] == "send" for r in e[1]}
print([len(s) for s in sends], [r for s in sends for r in s] == rids, [o["rid"] for o in outs] == rids,
      all(waited[r] < first_send[r] for r in rids))

calls = []


async def upstream(self, obj, request, states):
    calls.append(obj.batch_size)
    yield "upstream"

wrapped = dispatch.send_in_chunks(upstream, chunk=4)
text = GenerateReqInput(text=["a", "b"], sampling_params={"max_new_tokens": 1})
text.normalize_batch_and_arguments()
n2 = GenerateReqInput(input_ids=[[1], [2]], sampling_params={"n": 2})
n2.normalize_batch_and_arguments()
print([dispatch.batched_dispatch(o) for o in (batch(3), text, n2, batch(3, stream=True))])


async def run_with(fn, obj):
    return [out async for out in fn(None, obj, None, {})]

print([asyncio.run(run_with(wrapped, o)) for o in (text, n2, batch(3, stream=True))], calls)
"""


def test_install_wraps_only_cpu_engines_and_batches_go_in_ordered_chunks_with_waiters_first(tmp_path):
    assert run_probe(PROBE, tmp_path) == [
        "False True",
        "True True True True",
        "[32, 32, 6] True True True",
        "[True, False, False, False]",
        "[['upstream'], ['upstream'], ['upstream']] [2, 2, 3]",
    ]
