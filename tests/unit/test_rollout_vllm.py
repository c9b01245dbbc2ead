"""The thin vLLM adapter without vLLM: prompt building, sampling translation, weight naming, cache resets,
sleep mode. The fake ``LLM`` has exactly the methods vLLM 0.33.0 defines where it defines them
(``vllm/entrypoints/llm.py``: generate, collective_rpc, reset_prefix_cache, reset_mm_cache, sleep, wake_up,
llm_engine; ``vllm/v1/engine/llm_engine.py``: reset_encoder_cache, ...) and no catch-all ``__getattr__``."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_papo.rollout.vllm_engine import VLLMEngine, WeightSyncWorkerExtension


class FakeLLMEngine:
    """``LLM.llm_engine`` (vLLM 0.33.0 ``v1/engine/llm_engine.py``): where ``reset_encoder_cache`` lives."""

    def __init__(self, calls: list[tuple]):
        self.calls = calls

    def reset_encoder_cache(self) -> None:
        self.calls.append(("reset", "encoder"))

    def reset_mm_cache(self) -> None:
        self.calls.append(("reset", "engine_mm"))

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset", "engine_prefix"))
        return True


class FakeLLM:
    """Records calls; its workers 'load' by reading the safetensors directory they are given."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.loaded: dict[str, torch.Tensor] = {}
        self.llm_engine = FakeLLMEngine(self.calls)

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", prompts, params))
        plist = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for p in plist:
            comps = [SimpleNamespace(token_ids=[5, 6], logprobs=[{5: SimpleNamespace(logprob=-0.5)},
                                                                  {6: SimpleNamespace(logprob=-1.5)}], finish_reason="length")
                     for _ in range(p.kw["n"])]
            outs.append(SimpleNamespace(outputs=comps))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("rpc", method))
        from safetensors.torch import load_file

        for f in sorted(Path(args[0]).glob("*.safetensors")):
            self.loaded.update(load_file(str(f)))
        return [len(self.loaded)]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset", "prefix"))
        return True

    def reset_mm_cache(self) -> None:
        self.calls.append(("reset", "mm"))

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None) -> bool:
        self.calls.append(("wake_up", tags))
        return True


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")

    class SP:
        def __init__(self, **kw):
            self.kw = kw

    mod.SamplingParams = SP
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return VLLMEngine(str(tiny_model_dir), llm_factory=FakeLLM, bucket_mb=1).start()


def test_engine_kwargs_and_banned(engine):
    kw = engine.llm.kwargs
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["worker_extension_cls"].endswith("WeightSyncWorkerExtension")
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert pad in engine.banned_ids and pad not in engine.allowed_ids
    assert set(engine.eos_ids) <= set(engine.allowed_ids)


def test_prompts_collapse_image_pads(engine):
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompts = engine.build_prompts([([1, pad, pad, pad, 2], ["img"]), ("hi", [])])
    assert prompts[0] == {"prompt_token_ids": [1, pad, 2], "multi_modal_data": {"image": ["img"]}}
    assert "multi_modal_data" not in prompts[1]


def test_generate_shapes_and_seeds(engine, fake_vllm):
    res = engine.generate([([1, 2], []), ([3], [])], n=3, sampling={"temperature": 0.7, "max_new_tokens": 5})
    assert [len(g) for g in res] == [3, 3]
    assert res[0][0].token_ids == [5, 6] and res[0][0].logprobs == [-0.5, -1.5] and res[0][0].finish_reason == "length"
    _, _, params = engine.llm.calls[-1]
    assert params.kw["logprobs"] == 0 and params.kw["max_tokens"] == 5 and params.kw["allowed_token_ids"] == engine.allowed_ids
    res = engine.generate([([1, 2], [])], n=2, sampling={}, seeds=[[7, 8]])
    _, prompts, params = engine.llm.calls[-1]
    assert len(prompts) == 2 and [p.kw["seed"] for p in params] == [7, 8] and len(res[0]) == 2


def test_update_weights_loads_names_and_resets_caches(engine):
    tensors = [("model.layers.0.mlp.up_proj.weight", torch.randn(300, 600)), ("visual.blocks.0.norm1.weight", torch.ones(64)),
               ("lm_head.weight", torch.randn(512, 128))]
    engine.update_weights(iter(tensors))
    assert set(engine.llm.loaded) == {n for n, _ in tensors}
    for n, t in tensors:
        assert torch.equal(engine.llm.loaded[n], t)
    resets = [c[1] for c in engine.llm.calls if c[0] == "reset"]
    assert set(resets[-3:]) == {"prefix", "mm", "encoder"}  # encoder: the scheduler's, through LLM.llm_engine


def test_worker_extension_prefers_reload_weights(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    got = {}
    ext = WeightSyncWorkerExtension()
    ext.model_runner = SimpleNamespace(reload_weights=lambda weights_iterator, is_checkpoint_format: got.update(weights_iterator))
    assert ext.load_safetensors_dir(str(tmp_path)) == 1 and set(got) == {"model.norm.weight"}


def test_from_config(tiny_model_dir):
    from megatron_papo.config.rollout import RolloutConfig

    eng = VLLMEngine.from_config(RolloutConfig(engine="vllm", engine_tp=2, bucket_mb=8), str(tiny_model_dir), llm_factory=FakeLLM)
    assert eng.engine_kwargs["tensor_parallel_size"] == 2 and eng.bucket_bytes == 8 << 20
    cfg = RolloutConfig(engine="vllm", engine_kwargs={"gpu_memory_utilization": 0.4, "enforce_eager": True})
    kw = VLLMEngine.from_config(cfg, str(tiny_model_dir), llm_factory=FakeLLM, device="cuda").engine_kwargs
    assert kw["gpu_memory_utilization"] == 0.4 and kw["enforce_eager"] is True and kw["enable_sleep_mode"] is True


def test_gpu_colocated_sleep_mode_and_memory(tiny_model_dir, monkeypatch):
    events: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache",)))
    eng = VLLMEngine(str(tiny_model_dir), llm_factory=FakeLLM, device="cuda").start()
    assert eng.llm.kwargs["enable_sleep_mode"] is True and eng.llm.kwargs["gpu_memory_utilization"] == 0.5
    assert eng.llm.kwargs["logprobs_mode"] == "processed_logprobs"
    eng.llm.calls = events  # one timeline for the engine's calls and the trainer's cache
    eng.release_memory()
    assert events == [("sleep", 1), ("empty_cache",)]
    events.clear()
    eng.resume_memory()
    assert events == [("empty_cache",), ("wake_up", None)]  # the trainer's cached blocks go back first
    sep = VLLMEngine(str(tiny_model_dir), llm_factory=FakeLLM, device="cuda", colocated=False)
    assert "enable_sleep_mode" not in sep.engine_kwargs and "gpu_memory_utilization" not in sep.engine_kwargs
    cpu = VLLMEngine(str(tiny_model_dir), llm_factory=FakeLLM, device="cpu").start()
    assert "enable_sleep_mode" not in cpu.llm.kwargs  # vLLM: sleep mode is not supported on CPU
    cpu.release_memory()
    cpu.resume_memory()
    assert cpu.llm.calls == []
    with pytest.raises(ValueError, match="processed_logprobs"):
        VLLMEngine(str(tiny_model_dir), llm_factory=FakeLLM, engine_kwargs={"logprobs_mode": "raw_logprobs"})
