"""CPU plumbing: a CPU engine's tokenizer manager does a rollout's per-sample requests' shared work once.

Why: rollouts send one request per sample (each with its own sampling seed), so SGLang 0.5.23's tokenizer manager
sees every prompt ``n`` times. For a pre-tokenized prompt (ours: token ids, never text) it then

- rebuilds the Qwen-VL image prompt template (placeholder expansion and M-RoPE positions,
  ``QwenVLImageProcessor._build_image_prompt_template``) once per copy: SGLang memoises it only for *string*
  prompts (``_cached_image_prompt_template``, an ``lru_cache`` of 256), and
- sends each copy to the scheduler as its own ZeroMQ message (``_send_one_request``): SGLang batches only requests
  without multimodal input (``_batch_has_text`` counts an image as text).

On the 2-core machine these two are about half of the engine host's CPU while it generates (py-spy), and with two
engines on two cores every host CPU-second is taken from the other engine's scheduler.

What :func:`install` changes, in the process that owns the CPU engine (before the engine starts):

1. ``_build_image_prompt_template`` is memoised for token-id prompts too, keyed by the ids and the image-grid
   shape, like SGLang's own string cache (the cached tuple holds immutable ids and offsets and tensors that
   ``compose_image_artifacts`` clones per request, so every request still owns its items).
2. A batch of pre-tokenized ``n=1`` generation requests (``input_ids`` given, no text, no embeddings, not
   streamed; :func:`batched_dispatch`) is handled by :func:`send_in_chunks`: each request is tokenized (and its
   images prepared) and its waiter built as in SGLang's sequential path, and every ``SEND_CHUNK`` requests go to
   the scheduler as one ``BatchTokenizedGenerateReqInput``, which the scheduler unpacks into the same per-request
   handling. Requests are unchanged; only how many messages carry them.

GPU engines keep SGLang's paths (there the features travel by CUDA IPC or shared memory per request; not measured).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from typing import Any, Callable

#: prompt templates kept per processor (SGLang keeps 256 for string prompts)
TEMPLATE_CACHE_SIZE = 256
#: requests per batch message to the scheduler (32 and 64 measured alike; 32 lets the scheduler start sooner)
SEND_CHUNK = 32

_PATCHED = False


def memoize_token_templates(build: Callable[..., Any], maxsize: int = TEMPLATE_CACHE_SIZE) -> Callable[..., Any]:
    """``build(self, input_text, grid_key)`` memoised per ``self`` for non-string ``input_text`` (a token-id
    sequence), least recently used first out; string prompts go straight to ``build`` (SGLang caches those)."""
    lock = threading.Lock()

    @functools.wraps(build)
    def wrapper(self: Any, input_text: Any, grid_key: tuple) -> Any:
        if isinstance(input_text, str):
            return build(self, input_text, grid_key)
        key = (tuple(int(t) for t in input_text), grid_key)
        with lock:
            cache = self.__dict__.setdefault("_megatron_papo_template_cache", OrderedDict())
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
                return hit
        out = build(self, input_text, grid_key)
        with lock:
            cache[key] = out
            while len(cache) > maxsize:
                cache.popitem(last=False)
        return out

    return wrapper


def batched_dispatch(obj: Any) -> bool:
    """True for the batches :func:`send_in_chunks` takes over: generation requests that all come as token ids (no
    text, no embeddings), one sample each (``n=1``: per-sample seeds), not streamed, and SGLang's colocated-batch
    input blocker off."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.utils import get_bool_env_var

    return (isinstance(obj, GenerateReqInput) and not obj.is_single and obj.text is None and obj.input_ids is not None
            and getattr(obj, "input_embeds", None) is None and getattr(obj, "parallel_sample_num", 1) == 1
            and not getattr(obj, "stream", False) and not get_bool_env_var("SGLANG_ENABLE_COLOCATED_BATCH_GEN"))


def send_in_chunks(handle_batch: Callable[..., Any], chunk: int = SEND_CHUNK) -> Callable[..., Any]:
    """``TokenizerManager._handle_batch_request`` whose :func:`batched_dispatch` batches go to the scheduler
    ``chunk`` requests per message.

    The steps are SGLang's own sequential path (each request tokenized, its multimodal inputs prepared, its
    waiter built from its state before it is sent) except that requests are dispatched together with
    ``_send_batch_request`` (one ``BatchTokenizedGenerateReqInput``, which the scheduler unpacks into the same
    per-request handling) every ``chunk`` requests, so the scheduler starts on the first chunk while the next is
    prepared. Any other batch goes to SGLang's method unchanged.
    """

    @functools.wraps(handle_batch)
    async def wrapper(self: Any, obj: Any, request: Any, request_states: Any) -> Any:
        if not batched_dispatch(obj):
            async for out in handle_batch(self, obj, request, request_states):
                yield out
            return
        generators, pending = [], []
        for i in range(obj.batch_size):
            sub = obj[i]
            tokenized = await self._tokenize_one_request(sub)
            state = self.rid_to_state[sub.rid]
            if sub.return_prompt_token_ids:
                state.prompt_token_ids = list(tokenized.input_ids)
            generators.append(self._wait_one_response(sub, request))  # holds the state: built before the send
            pending.append(tokenized)
            if len(pending) >= chunk or i + 1 == obj.batch_size:
                await self._send_batch_request(pending)
                pending = []
        yield await self._collect_batch_responses(generators)

    return wrapper


def install() -> bool:
    """Apply both changes in this process (CPU engines only; idempotent). Returns False (nothing changed)
    without ``SGLANG_USE_CPU_ENGINE=1``."""
    global _PATCHED
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        return False
    if _PATCHED:
        return True
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor

    QwenVLImageProcessor._build_image_prompt_template = memoize_token_templates(
        QwenVLImageProcessor.__dict__["_build_image_prompt_template"])
    TokenizerManager._handle_batch_request = send_in_chunks(TokenizerManager.__dict__["_handle_batch_request"])
    _PATCHED = True
    return True
