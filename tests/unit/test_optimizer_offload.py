"""Optimizer CPU offload: the OptimizerConfig that ``build_optimizer`` makes has what mcore's hybrid optimizer needs.

mcore's ``HybridDeviceOptimizer`` (``optimizer_cpu_offload``) reuses the precision-aware optimizer path: only with
``use_precision_aware_optimizer`` does the distributed optimizer hand it the bf16 shards (gradients in
``decoupled_grad``) and keep no fp32 master shards of its own on the GPU (Megatron-LM's argument check requires the
pair). ``tests/distributed/test_optimizer_offload.py`` builds the optimizer itself and checks who owns the masters.
"""

from __future__ import annotations

import pytest

from megatron_papo.parallel.training import OptimSettings, optimizer_config_kwargs


def _settings(fraction: float) -> OptimSettings:
    return OptimSettings(lr=1e-6, weight_decay=0.01, use_distributed_optimizer=True, bf16=True,
                         cpu_offload_fraction=fraction)


def test_offload_config_sets_the_precision_aware_path(monkeypatch):
    from megatron.core.optimizer import OptimizerConfig, optimizer_config

    kw = optimizer_config_kwargs(_settings(0.5), "cuda")
    # Megatron-LM's check: --optimizer-cpu-offload needs --use-precision-aware-optimizer (and mcore: the distributed
    # optimizer, Adam, decoupled weight decay)
    assert kw["optimizer_cpu_offload"] and kw["optimizer_offload_fraction"] == 0.5
    assert kw["use_precision_aware_optimizer"] and kw["use_distributed_optimizer"] and kw["optimizer"] == "adam"
    assert kw["decoupled_weight_decay"] and kw["pin_cpu_grads"] and kw["pin_cpu_params"]
    # mcore's OptimizerConfig validation asks TE for its version when the flag is on: answer as the GPU image does
    monkeypatch.setattr(optimizer_config, "is_te_min_version", lambda *a, **k: True)
    cfg = OptimizerConfig(**kw)
    assert cfg.use_precision_aware_optimizer_no_fp8_or_ds_fp8  # the switch distrib_optimizer.py reads
    assert not optimizer_config_kwargs(_settings(0.5), "cpu")["pin_cpu_grads"]


def test_without_offload_the_config_is_the_plain_one():
    from megatron.core.optimizer import OptimizerConfig

    kw = optimizer_config_kwargs(_settings(0.0), "cuda")
    assert not kw["optimizer_cpu_offload"] and "use_precision_aware_optimizer" not in kw
    assert not OptimizerConfig(**kw).use_precision_aware_optimizer  # builds without Transformer Engine


def test_precision_aware_needs_the_distributed_optimizer(monkeypatch):
    from megatron.core.optimizer import OptimizerConfig, optimizer_config

    monkeypatch.setattr(optimizer_config, "is_te_min_version", lambda *a, **k: True)
    kw = optimizer_config_kwargs(OptimSettings(lr=1e-6, bf16=True, cpu_offload_fraction=0.5), "cuda")
    with pytest.raises(AssertionError, match="distributed optimizer"):
        OptimizerConfig(**kw)  # config/schema.py rejects this combination first, naming the fields


def test_offload_with_fp8_param_gather_needs_delayed_scaling():
    """Megatron-LM's second rule for the hybrid optimizer: FP8 parameter all-gather only with delayed scaling."""
    from megatron_papo.config import ConfigError, load_config

    base = ["optim.cpu_offload_fraction=0.5", "optim.use_distributed_optimizer=true", "model.fp8_param_gather=true",
            "model.transformer_impl=transformer_engine", "model.fp8=hybrid"]
    with pytest.raises(ConfigError, match=r"model\.fp8_param_gather=true needs model\.fp8_recipe=delayed"):
        load_config(None, base)
    load_config(None, base + ["model.fp8_recipe=delayed", "model.fp8_bf16_first_last_layers=0"])
