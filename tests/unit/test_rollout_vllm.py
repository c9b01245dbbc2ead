"""The thin vLLM adapter without vLLM: prompt building, sampling translation, weight naming, cache resets."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_papo.rollout.vllm_engine import CACHE_RESETS, VLLMEngine, WeightSyncWorkerExtension


class FakeLLM:
    """Records calls; its workers 'load' by reading the safetensors directory they are given."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.loaded: dict[str, torch.Tensor] = {}

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

    def collective_rpc(self, method, args=()):
        self.calls.append(("rpc", method))
        from safetensors.torch import load_file

        for f in sorted(Path(args[0]).glob("*.safetensors")):
            self.loaded.update(load_file(str(f)))

    def __getattr__(self, name):
        if name in CACHE_RESETS:
            return lambda: self.calls.append(("reset", name))
        raise AttributeError(name)


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
    assert resets[-3:] == list(CACHE_RESETS)


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
