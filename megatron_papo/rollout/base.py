"""The rollout-engine protocol shared by the SGLang and vLLM adapters, with its request/result types.

An engine owns its processes (``start``/``shutdown``, also as a context manager) and offers:

* ``generate(requests, n, sampling) -> list[list[GenerationResult]]`` — ``n`` samples per request,
  in request order; each result carries the response token ids (including the EOS token when the
  response stopped on it), the log-prob of every sampled token and the finish reason.
* ``update_weights(named_tensors)`` — full HF *checkpoint*-named tensors (``model.*``, ``visual.*``,
  ``lm_head.*``), as one iterator or as buckets; the engine wraps them in its weight-update bracket.
* ``release_memory()`` / ``resume_memory()`` and ``health()``.

Every call has a timeout; a timeout or a dead engine raises :class:`EngineError` with a message
that says what happened, and the engine's processes are ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, Union

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def empty_cuda_cache() -> None:
    """Give this process's cached, unused CUDA blocks back to the driver, so that a colocated engine can map its
    memory again (a no-op where CUDA is not initialised, e.g. on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class EngineError(RuntimeError):
    """A rollout engine failed (died, refused a request, or could not start)."""


class EngineTimeoutError(EngineError):
    """A rollout engine call did not finish within its timeout; the engine has been shut down."""


class EngineDiedError(EngineError):
    """A rollout engine process exited while a call was in progress; the engine has been shut down."""


@dataclass
class SamplingParams:
    """Per-call sampling settings. ``temperature == 0`` is greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    #: stop on these ids in addition to the model's EOS ids (generation_config)
    stop_token_ids: Optional[list[int]] = None
    #: return the EOS token in ``token_ids`` when a response ends on it
    include_stop_token: bool = True
    #: keep generating past EOS until max_new_tokens (benchmarks, tests)
    ignore_eos: bool = False

    @classmethod
    def coerce(cls, value: Union[SamplingParams, Mapping[str, Any], None]) -> SamplingParams:
        """Accept a SamplingParams, a dict with the same keys, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, SamplingParams):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown sampling keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**dict(value))


@dataclass
class GenerationRequest:
    """One prompt. Give either ``prompt_ids`` (chat-templated token ids, image pads collapsed or
    processor-expanded — see :func:`megatron_papo.rollout.tokens.to_engine_prompt_ids`) or ``prompt``
    (the chat-templated text, one ``<|image_pad|>`` per image), plus the PIL images in order."""

    prompt_ids: Optional[list[int]] = None
    images: list[Any] = field(default_factory=list)
    prompt: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.prompt_ids is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of prompt_ids or prompt")

    @classmethod
    def coerce(cls, value: Any) -> GenerationRequest:
        """Accept a GenerationRequest or a ``(prompt_text_or_ids, images)`` pair."""
        if isinstance(value, GenerationRequest):
            return value
        prompt, images = value
        images = list(images or [])
        if isinstance(prompt, str):
            return cls(prompt=prompt, images=images)
        return cls(prompt_ids=[int(t) for t in prompt], images=images)


@dataclass
class GenerationResult:
    """One sampled response."""

    token_ids: list[int]
    #: log-prob of each sampled token under the engine's sampling distribution: log_softmax of the
    #: logits divided by the temperature, after banned ids were set to -inf, before top-p/top-k
    #: truncation (greedy: log_softmax of the raw, banned-masked logits). Same length as token_ids.
    logprobs: list[float]
    #: "stop" (EOS or a stop id) or "length" (max_new_tokens) or "abort"
    finish_reason: str
    #: number of prompt tokens the engine saw (image pads expanded)
    prompt_len: int = 0


class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine (SGLang, vLLM)."""

    def start(self) -> RolloutEngine: ...

    def shutdown(self) -> None: ...

    def __enter__(self) -> RolloutEngine: ...

    def __exit__(self, *exc: Any) -> None: ...

    def generate(self, requests: Sequence[Any], n: int = 1, sampling: Any = None,
                 seeds: Optional[Sequence[Sequence[int]]] = None) -> list[list[GenerationResult]]: ...

    def update_weights(self, named_tensors: Union[NamedTensors, Iterable[list[tuple[str, torch.Tensor]]]]) -> None: ...

    def release_memory(self) -> None: ...

    def resume_memory(self) -> None: ...

    def health(self) -> dict[str, Any]: ...
