"""``rollout.engine_kwargs`` (typed passthrough, validated against SGLang's ServerArgs), the GPU defaults of a
colocated SGLang engine, the trainer-side CUDA cache handling around release/resume, and the colocated +
distributed placement check. No engine is started: the engine's keyword arguments and its host calls are
what is checked (issue 12 items 4 and 5).
"""

from __future__ import annotations

import pytest
import torch
import yaml

from megatron_papo.config import ConfigError, dump, load_config
from megatron_papo.config.rollout import RolloutConfig


def test_engine_kwargs_from_overrides_yaml_and_dump(tmp_path):
    cfg = load_config(None, ["rollout.engine_kwargs.mem_fraction_static=0.3",
                             "rollout.engine_kwargs.enable_weights_cpu_backup=false"])
    assert cfg.rollout.engine_kwargs == {"mem_fraction_static": 0.3, "enable_weights_cpu_backup": False}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"rollout": {"engine_kwargs": {"chunked_prefill_size": 512,
                                                                    "mem_fraction_static": 0.6}}}))
    cfg = load_config(str(recipe), ["rollout.engine_kwargs.mem_fraction_static=0.4"])  # override one key, keep the other
    assert cfg.rollout.engine_kwargs == {"chunked_prefill_size": 512, "mem_fraction_static": 0.4}
    assert load_config(None, ["rollout.engine_kwargs={max_running_requests: 8}"]).rollout.engine_kwargs == \
        {"max_running_requests": 8}
    assert load_config(None, []).rollout.engine_kwargs == {}
    dump(cfg, tmp_path / "out.yaml")
    again = load_config(str(tmp_path / "out.yaml"), [])
    assert again.rollout.engine_kwargs == cfg.rollout.engine_kwargs


def test_engine_kwargs_rejected_with_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.engine_kwargs.mem_fraction_statc=0.3"])
    msg = str(e.value)
    assert "\n" not in msg and "mem_fraction_statc" in msg and "ServerArgs" in msg and "mem_fraction_static" in msg
    with pytest.raises(ConfigError, match=r"engine_kwargs.tp_size is set by rollout.engine_tp"):
        load_config(None, ["rollout.engine_kwargs.tp_size=2"])
    with pytest.raises(ConfigError, match=r"engine_kwargs.random_seed is set by rollout.seed"):
        load_config(None, ["rollout.engine_kwargs.random_seed=3"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(None, ["rollout.engine_kwargs=3"])


def test_colocated_gpu_engine_defaults(tiny_model_dir):
    from megatron_papo.rollout.sglang_engine import CPU_ENGINE_KWARGS, SGLangEngine

    gpu = SGLangEngine(str(tiny_model_dir), device="cuda").engine_kwargs
    assert gpu["enable_memory_saver"] is True and gpu["enable_weights_cpu_backup"] is True
    assert gpu["mem_fraction_static"] == 0.5 and "base_gpu_id" not in gpu and "device" not in gpu
    cfg = RolloutConfig(engine_kwargs={"mem_fraction_static": 0.3, "enable_weights_cpu_backup": False}, engine_tp=2)
    kw = SGLangEngine.from_config(cfg, str(tiny_model_dir), device="cuda").engine_kwargs
    assert kw["mem_fraction_static"] == 0.3 and kw["enable_weights_cpu_backup"] is False  # the user's keys win
    assert kw["enable_memory_saver"] is True and kw["tp_size"] == 2
    sep = RolloutConfig(placement="separate", transport="distributed", engine_base_gpu=4)
    kw = SGLangEngine.from_config(sep, str(tiny_model_dir), device="cuda").engine_kwargs
    assert kw["base_gpu_id"] == 4 and "enable_memory_saver" not in kw and "mem_fraction_static" not in kw
    cpu = SGLangEngine.from_config(RolloutConfig(), str(tiny_model_dir), device="cpu").engine_kwargs
    assert {k: cpu[k] for k in CPU_ENGINE_KWARGS} == CPU_ENGINE_KWARGS and "enable_memory_saver" not in cpu
    assert cpu["sleep_on_idle"] is True and gpu["sleep_on_idle"] is True  # idle schedulers do not spin a core
    quiet = RolloutConfig(engine_kwargs={"sleep_on_idle": False})
    assert SGLangEngine.from_config(quiet, str(tiny_model_dir), device="cpu").engine_kwargs["sleep_on_idle"] is False


def test_server_engines_sleep_on_idle_too(tiny_model_dir):
    from megatron_papo.rollout.sglang_server import SGLangServerEngine, server_argv

    eng = SGLangServerEngine(str(tiny_model_dir), device="cpu", port=1)
    assert "--sleep-on-idle" in server_argv(eng.engine_kwargs, "127.0.0.1", 1)


@pytest.fixture
def cuda_log(monkeypatch):
    """Pretend CUDA is up in this (the trainer's) process and log empty_cache calls."""
    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    return log


def test_release_resume_empty_the_trainer_cache_in_order(tiny_model_dir, cuda_log):
    from megatron_papo.rollout.sglang_engine import SGLangEngine

    eng = SGLangEngine(str(tiny_model_dir), device="cuda")
    eng._call = lambda method, *a, **k: cuda_log.append(method)
    eng.release_memory()
    assert cuda_log == ["release", "empty_cache"]
    cuda_log.clear()
    eng.resume_memory()
    assert cuda_log == ["empty_cache", "resume"]  # the trainer's cached blocks go back before the engine maps again
    cpu = SGLangEngine(str(tiny_model_dir), device="cpu")
    cpu._call = lambda method, *a, **k: cuda_log.append(method)
    cuda_log.clear()
    cpu.release_memory()
    cpu.resume_memory()
    assert cuda_log == []  # CPU: unchanged, nothing is called


def test_colocated_distributed_rejected_on_gpu_only():
    from megatron_papo.train import check_placement

    colo = load_config(None, ["rollout.transport=distributed"])
    check_placement(colo, "cpu", 2)  # gloo on CPU: trainer rank 0 and the engine are separate processes; works
    with pytest.raises(ConfigError, match="NCCL refuses") as e:
        check_placement(colo, "cuda", 2)
    assert "\n" not in str(e.value) and "rollout.transport=tensor" in str(e.value)
    with pytest.raises(ConfigError, match="NCCL refuses"):
        check_placement(load_config(None, ["rollout.transport=distributed", "rollout.mode=server"]), "cuda", 1)
    check_placement(load_config(None, ["rollout.transport=tensor"]), "cuda", 2)
    check_placement(load_config(None, ["rollout.transport=disk"]), "cuda", 2)
    sep = load_config(None, ["rollout.placement=separate", "rollout.transport=distributed", "rollout.engine_base_gpu=2"])
    if torch.cuda.device_count() < 3:
        with pytest.raises(ConfigError, match="exceeds the"):  # separate GPUs: the NCCL group is fine, the count is not
            check_placement(sep, "cuda", 2)
