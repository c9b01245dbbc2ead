"""CPU engines send multimodal features inline with the request (``rollout/cpu_shim/mm_transport.py``).

SGLang's tokenizer manager wraps each request's feature tensors with ``mm_utils.wrap_shm_features``; on one node
(``determine_tensor_transport_mode() == "cuda_ipc"``) a CPU tensor becomes a ``ShmPointerMMData`` -- a fresh
shared-memory segment per request. After :func:`mm_transport.install` the same call leaves the tensor in the request
(SGLang's inline ``"default"`` transport) and the scheduler side's ``unwrap_shm_features`` hands it over unchanged.
Without ``SGLANG_USE_CPU_ENGINE=1`` (GPU engines) nothing is installed. Runs in a fresh interpreter: the choice is a
module-level cache of SGLang's. Engines generating with images under the patch: every test in ``tests/integration``.
"""

from __future__ import annotations

from tests.harness import run_probe

PROBE = r"""
import os
import pickle
from types import SimpleNamespace

import torch
from sglang.srt.managers import mm_utils

from megatron_papo.rollout.cpu_shim import mm_transport

# what SGLang decides on one node (its runtime context is not set up outside a server)
mm_utils.determine_tensor_transport_mode = lambda: "cuda_ipc"
mm_utils.get_serving = lambda: SimpleNamespace(skip_tokenizer_init=False)


def round_trip(feature):
    item = SimpleNamespace(hash=7, feature=feature, precomputed_embeddings=None)
    req = SimpleNamespace(mm_inputs=SimpleNamespace(mm_items=[item]))
    sent = type(mm_utils.wrap_shm_features(req).mm_inputs.mm_items[0].feature).__name__
    received = pickle.loads(pickle.dumps(item.feature))  # the request crosses to the scheduler pickled (zmq)
    got = mm_utils._unwrap_tensor_or_list(received)  # what the scheduler's unwrap_shm_features does per item
    return sent, bool(torch.equal(got, feature))


pixels = torch.randn(16, 1176)
os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
print(mm_transport.install(), *round_trip(pixels))
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
print(mm_transport.install(), *round_trip(pixels))
"""


def test_cpu_engine_features_travel_inline_and_gpu_engines_keep_sglangs_choice(tmp_path):
    assert run_probe(PROBE, tmp_path) == ["False ShmPointerMMData True", "True Tensor True"]
