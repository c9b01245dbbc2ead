"""SGLang rollout engine: an ``sglang.Engine`` in a process this object owns (see ``_sglang_host``).

    with SGLangEngine(hf_dir) as eng:                       # CPU or GPU, chosen by torch.cuda
        res = eng.generate([(prompt_ids, [img])], n=8, sampling={"temperature": 1.0, "max_new_tokens": 64})
        eng.update_weights(hf_named_tensors)                 # checkpoint names: model.*, visual.*, lm_head.*

Weight transports (``transport=``): ``"tensor"`` (CPU: tensors shared through the host pipe;
GPU: flattened buckets serialised as CUDA-IPC handles — NOT run by CI), ``"distributed"`` (a
gloo/NCCL group with the scheduler, ``update_weights_from_distributed`` with flattened buckets),
``"disk"`` (safetensors written to a directory, ``update_weights_from_disk``). Every update runs
inside SGLang's ``begin_weight_update`` … ``end_weight_update`` bracket and flushes the prefix
cache; the multimodal embedding cache is disabled (``SGLANG_VLM_CACHE_SIZE_MB=0``) because it
survives weight updates.

Log-probs: SGLang returns ``log_softmax(logits / T)`` of the sampled token with banned ids at
``-inf`` (greedy: ``log_softmax(logits)``), computed before top-p/top-k truncation; the trainer
divides its logits by the same temperature and masks the same :func:`banned_token_ids`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import time
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from megatron_papo.rollout.base import (
    EngineDiedError,
    EngineError,
    EngineTimeoutError,
    GenerationRequest,
    GenerationResult,
    NamedTensors,
    SamplingParams,
    empty_cuda_cache,
)
from megatron_papo.rollout.procs import TrackedProcess, end_processes, track_tree
from megatron_papo.rollout.tokens import PLACEHOLDER_TOKENS, banned_token_ids, eos_token_ids, to_engine_prompt_ids
from megatron_papo.rollout.weight_transport import push_buckets

log = logging.getLogger(__name__)

#: Defaults of every SGLang engine (CPU and GPU, in-process and servers).
#:
#: * ``sleep_on_idle``: SGLang's scheduler otherwise busy-polls its sockets and holds one CPU core at 100% while it
#:   has no work -- i.e. during every training phase. Measured on the 2-core CI machine: an idle scheduler of the tiny
#:   model used 101% of a core without it and 2% with it (``zmq.Poller`` wakes it at once when a request arrives).
#:   Colocated engines idle while the actor trains, so the spinning cores were taken from the trainer's own ranks
#:   (on GPU: from its data loading, host copies and launch threads, one core per engine).
ENGINE_KWARGS: dict[str, Any] = {"sleep_on_idle": True}

CPU_ENGINE_KWARGS: dict[str, Any] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "disable_cuda_graph": True,
    # without these SGLang sizes its KV pool from total RAM (18 GB RSS for the tiny model)
    "max_total_tokens": 16384,
    "max_running_requests": 64,
    # KV budget = free RAM - (1 - fraction) * RAM at start; max_total_tokens caps it. A small fraction fails
    # when other processes take RAM while the weights load.
    "mem_fraction_static": 0.8,
    # SGLang's preprocessing cache (decoded, resized, normalised images by content hash; independent of the
    # weights): with per-sample seeds every sample is its own request, so without it a prompt's image is
    # preprocessed n times. Measured (64 prompts x 8 seeded samples, tiny model, in-process engine under cProfile):
    # host 1.43 -> 0.98 CPU-seconds per round, 3.2 -> 2.7 s; outputs unchanged (``output_digests`` of
    # tools/bench/rollout_fleet.py, README "Scaling").
    "mm_preprocess_cache_size_mb": 64,
}

#: GPU defaults of a colocated engine (it shares the trainer's GPUs and gives them back while the actor trains).
#: Read against SGLang 0.5.23 (``managers/scheduler_components/weight_updater.py``, ``utils/torch_memory_saver_adapter.py``,
#: ``model_executor/model_runner_components/load_model_utils.py``, ``mem_cache/kv_cache_configurator.py``):
#:
#: * ``enable_memory_saver``: without it SGLang uses a no-op adapter and ``release_memory_occupation`` frees nothing.
#: * ``enable_weights_cpu_backup``: the released weights are otherwise lost and come back as garbage; a resume is
#:   not always followed by a full push (``rollout.skip_frozen`` pushes frozen parameters once, ``mode=rollout_only``
#:   never pushes, evaluation may generate before a sync). Costs one pinned host copy of the engine's weights.
#:   Turn it off with ``rollout.engine_kwargs.enable_weights_cpu_backup=false`` when every resume is followed by a
#:   full push (no frozen parameters, ``skip_frozen=false``).
#: * ``mem_fraction_static=0.5``: SGLang 0.5.23 sizes weights + KV pool as ``f * (memory free when the engine
#:   starts)`` (``pre_model_load_memory``), i.e. after the actor and the reference are already resident. What the
#:   trainer allocates later and keeps across a resume -- Adam moments, created at the first optimizer step
#:   (8 bytes/param in fp32, 4x bf16 weights, divided by DP with the distributed optimizer) -- and the engine's own
#:   non-static memory (sampling, vision encoder activations, CUDA graphs) must fit into the other half. 0.5 is
#:   also verl's colocated default (``gpu_memory_utilization``). Raise it when the optimizer is offloaded.
GPU_COLOCATED_ENGINE_KWARGS: dict[str, Any] = {
    "enable_memory_saver": True,
    "enable_weights_cpu_backup": True,
    "mem_fraction_static": 0.5,
}



class SGLangEngine:
    """The SGLang engine behind the :class:`~megatron_papo.rollout.base.RolloutEngine` protocol."""

    #: the host process entry point (``_sglang_host.host_main``); tests substitute a fake host here
    host_target: Optional[Any] = None
    #: on CPU the host starts SGLang's schedulers with ``cpu_shim/seeded.py`` (per-request seeds honoured)
    cpu_seeded_sampling: bool = True

    def __init__(self, model_path: str, *, device: str = "auto", tp_size: int = 1, timeout_s: float = 600.0,
                 start_timeout_s: float = 900.0, seed: int = 1, transport: str = "tensor", bucket_mb: int = 512,
                 dtype: str = "auto", log_level: str = "error", engine_kwargs: Optional[dict[str, Any]] = None,
                 ban_special_tokens: bool = True, base_gpu_id: int = -1, colocated: Optional[bool] = None) -> None:
        """``colocated`` (GPU): the engine shares the trainer's GPUs, so it starts with
        :data:`GPU_COLOCATED_ENGINE_KWARGS`; None = colocated unless ``base_gpu_id >= 0``. ``engine_kwargs``
        (``sglang.Engine`` / ServerArgs fields) override every default."""
        self.model_path = str(model_path)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.transport = transport
        self.bucket_bytes = int(bucket_mb) << 20
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        cfg = AutoConfig.from_pretrained(self.model_path)
        if dtype == "auto":  # the checkpoint's own dtype; SGLang's "auto" would turn float32 into float16
            dtype = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "auto").removeprefix("torch.")
        kw: dict[str, Any] = {"model_path": self.model_path, "tp_size": tp_size, "random_seed": seed, "dtype": dtype,
                              "log_level": log_level, "skip_server_warmup": True, **ENGINE_KWARGS}
        if self.device == "cpu":
            kw.update(CPU_ENGINE_KWARGS)
        else:
            if colocated if colocated is not None else base_gpu_id < 0:
                kw.update(GPU_COLOCATED_ENGINE_KWARGS)
            if base_gpu_id >= 0:  # placement=separate: the engine's GPUs start here, after the trainer's
                kw["base_gpu_id"] = base_gpu_id
        kw.update(engine_kwargs or {})
        self.engine_kwargs = kw
        vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None)
        try:
            gen_eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        except OSError:
            gen_eos = None
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_ids = eos_token_ids(self.tokenizer, gen_eos)
        self.banned_ids = banned_token_ids(self.tokenizer, vocab, allowed=self.eos_ids) if ban_special_tokens else []
        self.pad_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in PLACEHOLDER_TOKENS]
        self._proc: Optional[Any] = None
        self._conn: Optional[Any] = None
        self._tracked: list[TrackedProcess] = []  # every process ended at shutdown
        self._vital: list[TrackedProcess] = []  # host + SGLang's own children: one dying = the engine died
        self._update_group: Optional[Any] = None
        self._group_seq = 0
        self._warned_seeds = False

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def from_config(cls, cfg: Any, model_path: str, **kwargs: Any) -> SGLangEngine:
        """Build (not start) from a :class:`~megatron_papo.config.rollout.RolloutConfig` section
        (``mode=server`` gives a :class:`~megatron_papo.rollout.sglang_server.SGLangServerEngine`)."""
        mode = getattr(cfg, "mode", "colocated")
        if mode not in ("colocated", "server"):
            raise ValueError(f"rollout.mode={mode!r}; expected colocated or server")
        if mode == "server":
            from megatron_papo.rollout.sglang_server import SGLangServerEngine

            cls = SGLangServerEngine
        kwargs.setdefault("colocated", cfg.placement == "colocated")
        return cls(model_path, tp_size=cfg.engine_tp, timeout_s=cfg.timeout_s, start_timeout_s=cfg.start_timeout_s,
                   seed=cfg.seed, transport=cfg.transport, bucket_mb=cfg.bucket_mb, engine_kwargs=dict(cfg.engine_kwargs),
                   base_gpu_id=cfg.engine_base_gpu, **kwargs)

    def start(self) -> SGLangEngine:
        """Start the host process and the SGLang engine in it; raise EngineError if it cannot start."""
        if self._proc is not None:
            return self
        env = {"SGLANG_VLM_CACHE_SIZE_MB": "0"}
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        from megatron_papo.rollout._sglang_host import host_main

        self._proc = ctx.Process(target=self.host_target or host_main, args=(child, self.engine_kwargs, env),
                                 name="sglang-host", daemon=False)
        t0 = time.perf_counter()
        self._proc.start()
        atexit.register(self.shutdown)  # the host is not a daemon (it has children): never leave it to block exit
        child.close()
        self._conn = parent
        self._tracked = track_tree(self._proc.pid)
        info = self._recv("start", self.start_timeout_s)
        self._tracked = track_tree(self._proc.pid, tuple(info.get("children", ())))
        vital = {self._proc.pid, *info.get("children", ())}
        self._vital = [t for t in self._tracked if t.pid in vital]
        log.info("SGLang engine up in %.1fs (host pid %d, %d processes)", time.perf_counter() - t0, self._proc.pid,
                 len(self._tracked))
        return self

    def shutdown(self) -> None:
        """Stop the engine and end every process it started (idempotent)."""
        if self._proc is None:
            return
        atexit.unregister(self.shutdown)
        try:
            if self._proc.is_alive() and self._conn is not None:
                self._conn.send(("shutdown", {}))
                self._proc.join(timeout=60)
        except (OSError, EOFError, BrokenPipeError):
            pass
        finally:
            self._kill()

    def __enter__(self) -> SGLangEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:  # last resort; explicit shutdown() is the contract
        try:
            self._kill()
        except Exception:
            pass

    def pids(self) -> list[int]:
        """Pids of every live process this engine started (host, scheduler, detokenizer, ...)."""
        return [t.pid for t in self._tracked if t.alive()]

    def _kill(self) -> None:
        tracked, self._tracked, self._vital = self._tracked, [], []
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if tracked:
            end_processes(tracked)
        if self._proc is not None:
            self._proc.join(timeout=5)
            self._proc = None

    # ------------------------------------------------------------------ host calls
    def _running(self) -> bool:
        """Whether calls can reach the engine (its host process runs; an external server overrides this)."""
        return self._proc is not None

    def _send(self, method: str, **kwargs: Any) -> None:
        if self._proc is None or self._conn is None:
            raise EngineError(f"SGLang engine is not running (call start() first); cannot {method}")
        try:
            self._conn.send((method, kwargs))
        except (OSError, BrokenPipeError) as e:
            self._died(method, e)

    def _recv(self, method: str, timeout: Optional[float] = None) -> Any:
        timeout = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self._conn is None:
                raise EngineError(f"SGLang engine was shut down during {method}")
            try:
                ready = self._conn.poll(0.2)
            except (OSError, EOFError) as e:
                self._died(method, e)
            if ready:
                try:
                    status, payload = self._conn.recv()
                except (EOFError, OSError) as e:
                    self._died(method, e)
                if status == "ok":
                    return payload
                if method == "start":
                    self._kill()
                raise EngineError(f"SGLang {method} failed in the engine:\n{payload}")
            dead = [t.pid for t in self._vital if not t.alive()]
            if dead or not self._proc.is_alive():
                self._died(method, None, dead)
            if time.monotonic() > deadline:
                self._kill()
                raise EngineTimeoutError(f"SGLang {method} did not finish within {timeout:.0f}s "
                                         f"(rollout.timeout_s); the engine was shut down")

    def _died(self, method: str, err: Optional[BaseException], dead: Sequence[int] = ()) -> None:
        code = self._proc.exitcode if self._proc is not None else None
        self._kill()
        raise EngineDiedError(f"SGLang engine died during {method} (host exit code {code}, dead pids {list(dead)}"
                              f"{', ' + repr(err) if err else ''}); its processes were ended")

    def _call(self, method: str, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        self._send(method, **kwargs)
        return self._recv(method, timeout)

    # ------------------------------------------------------------------ generation
    @property
    def honours_seeds(self) -> bool:
        """Per-request ``sampling_seed`` is used: GPU with deterministic inference, or the CPU engine (whose
        schedulers run ``cpu_shim/seeded.py``)."""
        return bool(self.engine_kwargs.get("enable_deterministic_inference")) or (
            self.device == "cpu" and self.cpu_seeded_sampling)

    def _engine_ids(self, req: GenerationRequest) -> list[int]:
        if req.prompt_ids is not None:
            return to_engine_prompt_ids(req.prompt_ids, self.pad_ids)
        return self.tokenizer.encode(req.prompt, add_special_tokens=False)

    def _sampling_dict(self, sp: SamplingParams, n: int, seed: Optional[int]) -> dict[str, Any]:
        d: dict[str, Any] = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
                             "max_new_tokens": sp.max_new_tokens, "n": n, "skip_special_tokens": False,
                             "no_stop_trim": sp.include_stop_token}
        if sp.ignore_eos:
            d["ignore_eos"] = True
        if sp.stop_token_ids:
            d["stop_token_ids"] = list(sp.stop_token_ids)
        if self.banned_ids:
            d["logit_bias"] = {str(i): float("-inf") for i in self.banned_ids}
        if seed is not None:
            d["sampling_seed"] = int(seed)
        return d

    def generate(self, requests: Sequence[Any], n: int = 1, sampling: Union[SamplingParams, dict, None] = None,
                 seeds: Optional[Sequence[Sequence[int]]] = None, timeout: Optional[float] = None
                 ) -> list[list[GenerationResult]]:
        """``n`` responses for each request (GenerationRequest or ``(prompt_text_or_ids, images)``).

        Each request is sent once with SGLang's parallel sampling (shared prefill). ``seeds[i][k]``
        (one per sample) are honoured when :attr:`honours_seeds`: on CPU (``cpu_shim/seeded.py``) or with
        ``engine_kwargs={"enable_deterministic_inference": True}`` on GPU — then every sample is its own
        request with that ``sampling_seed``; otherwise they are ignored (warned once) and samples come
        from the engine's RNG (``random_seed``).
        Returns ``results[i][k]`` for request i, sample k.
        """
        reqs = [GenerationRequest.coerce(r) for r in requests]
        if not reqs:
            return []
        if seeds is not None and not self.honours_seeds:
            if not self._warned_seeds:
                log.warning("SGLangEngine: per-sample seeds ignored (start with enable_deterministic_inference=True to use them)")
                self._warned_seeds = True
            seeds = None
        sp = SamplingParams.coerce(sampling)
        ids, images, params = [], [], []
        for i, r in enumerate(reqs):
            reps = [(n, None)] if seeds is None else [(1, s) for s in seeds[i]]
            if seeds is not None and len(seeds[i]) != n:
                raise ValueError(f"seeds[{i}] has {len(seeds[i])} entries, expected n={n}")
            for count, seed in reps:
                ids.append(self._engine_ids(r))
                images.append(list(r.images))
                params.append(self._sampling_dict(sp, count, seed))
        kw: dict[str, Any] = {"input_ids": ids, "sampling_params": params, "return_logprob": True}
        if any(images):
            # [] (not None) for a text-only request: SGLang reads a list whose first entry is not a list as one
            # image per request, so a text-only request first would turn the next request's images into one "image"
            kw["image_data"] = images
        outs = self._call("generate", timeout, **kw)
        results = [self._result(o) for o in outs]
        if len(results) != len(reqs) * n:
            raise EngineError(f"SGLang returned {len(results)} responses for {len(reqs)} requests x n={n}")
        return [results[i * n:(i + 1) * n] for i in range(len(reqs))]

    @staticmethod
    def _result(out: dict) -> GenerationResult:
        meta = out["meta_info"]
        fin = meta.get("finish_reason") or {}
        reason = fin.get("type", "abort") if isinstance(fin, dict) else str(fin)
        if reason == "abort":
            raise EngineError(f"SGLang aborted a request: {fin}")
        lps = [float(t[0]) for t in meta.get("output_token_logprobs") or []]
        ids = [int(t) for t in out["output_ids"]]
        return GenerationResult(token_ids=ids, logprobs=lps, finish_reason=reason, prompt_len=int(meta.get("prompt_tokens", 0)))

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Union[NamedTensors, Iterable[list[tuple[str, torch.Tensor]]]],
                       transport: Optional[str] = None, bucket_mb: Optional[int] = None) -> dict[str, float]:
        """Push full HF checkpoint-named tensors (an iterator of pairs, or of buckets = lists of pairs).

        Returns ``{"tensors", "bytes", "seconds"}``.
        """
        bucket_bytes = self.bucket_bytes if bucket_mb is None else int(bucket_mb) << 20
        return push_buckets(self, named_tensors, transport or self.transport, bucket_bytes)

    def update_weights_from_disk(self, model_dir: str) -> None:
        """Load every safetensors file in ``model_dir`` (checkpoint names) into the running engine."""
        self._check(self._call("update_disk", model_path=str(model_dir)), "update_weights_from_disk")
        self._check(self._call("flush_cache"), "flush_cache", allow_none=True)

    @staticmethod
    def _check(res: Any, what: str, allow_none: bool = False) -> Any:
        """SGLang answers (success, message[, ...]), an object with .success or (HTTP) a dict; raise on failure."""
        if res is None and allow_none:
            return res
        if isinstance(res, dict):
            ok = res.get("success", True)
        else:
            ok = res[0] if isinstance(res, (tuple, list)) else getattr(res, "success", res)
        if ok is False:
            raise EngineError(f"SGLang {what} failed: {res}")
        return res

    # ------------------------------------------------------------------ memory / health
    def release_memory(self) -> None:
        """Release KV cache, weights and CUDA-graph memory (GPU; frees something only with ``enable_memory_saver``,
        a colocated default), then empty this (the trainer's) process's CUDA cache. A no-op on CPU: there it frees
        nothing, and SGLang 0.5.23's scheduler calls ``torch.cuda.synchronize()`` in it and dies."""
        if self.device != "cpu":
            self._call("release")
            empty_cuda_cache()

    def resume_memory(self) -> None:
        """Undo :meth:`release_memory`: first return the trainer's cached CUDA blocks (training activations) to the
        driver, so the engine can map its memory again, then resume (no-op on CPU)."""
        if self.device != "cpu":
            empty_cuda_cache()
            self._call("resume")

    def health(self, timeout: float = 30.0) -> dict[str, Any]:
        """``{"ok", "pids", "host_pid"}``; ``ok`` is False (never raises) when the engine is gone."""
        if self._proc is None:
            return {"ok": False, "pids": [], "host_pid": None}
        try:
            info = self._call("ping", timeout)
            return {"ok": True, "pids": self.pids(), "host_pid": info["pid"]}
        except EngineError as e:
            return {"ok": False, "pids": self.pids(), "host_pid": None, "error": str(e)}

    @property
    def host_pid(self) -> Optional[int]:
        """Pid of the host process (None when stopped)."""
        return self._proc.pid if self._proc is not None else None
