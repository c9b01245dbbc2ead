"""Config system: recipes, overrides, strict typing, one-line errors, dump round trip, CLI exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from megatron_papo.config import Config, ConfigError, dump, from_dict, load_config, to_dict
from megatron_papo.parallel.dims import ParallelDims


def test_defaults_are_papo_g():
    cfg = load_config(None)
    assert cfg.algo.clip_ratio_low == 0.2 and cfg.algo.clip_ratio_high == 0.3 and cfg.algo.clip_ratio_dual == 3.0
    assert cfg.rollout.n == 5 and cfg.rollout.top_p == 0.99 and cfg.data.mask_prob == 0.6 and cfg.data.mask_size == 14


def test_overrides_and_types():
    cfg = load_config(None, ["parallel.tp=2", "optim.lr=3e-4", "logging.progress=false", "rollout.n=8"])
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 3e-4 and cfg.logging.progress is False and cfg.rollout.n == 8


@pytest.mark.parametrize("override, fragment", [
    ("parallel.tp=abc", "parallel.tp: got 'abc', expected int"),
    ("foo.bar=1", "unknown config key 'foo'"),
    ("parallel.tpp=2", "unknown config key 'parallel.tpp'"),
    ("algo.kl_prcp_estimator=magic", "expected one of ['k3_sampled', 'exact']"),
    ("logging.progress=maybe", "expected bool"),
    ("optim.rollout_batch_size=100", "must be a multiple of optim.global_batch_size"),
    ("model.fp8=e4m3", "needs model.transformer_impl=transformer_engine"),
    ("parallel", "not of the form key.sub=value"),
    ("rollout.placement=separate", "needs rollout.transport=distributed or disk"),
    ("rollout.engine_base_gpu=4", "is for placement=separate"),
    ("optim.cpu_offload_fraction=0.5", "needs optim.use_distributed_optimizer=true"),
    ("optim.cpu_offload_fraction=2", "must be in [0, 1]"),
    ("optim.micro_batch_tokens=-1", "must be >= 0"),
    ("optim.pack_sequences=true", "needs optim.micro_batch_tokens > 0"),
])
def test_bad_overrides_one_line(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_token_budget_needs_fixed_shapes_off():
    with pytest.raises(ConfigError, match="pipeline parallelism"):
        load_config(None, ["optim.micro_batch_tokens=4096", "parallel.pp=2"])
    assert load_config(None, ["optim.micro_batch_tokens=4096", "parallel.tp=2"]).optim.micro_batch_tokens == 4096
    with pytest.raises(ConfigError, match="transformer_impl=local"):
        load_config(None, ["optim.micro_batch_tokens=4096", "optim.pack_sequences=true",
                           "model.transformer_impl=transformer_engine"])
    assert load_config(None, ["optim.micro_batch_tokens=4096", "optim.pack_sequences=true"]).optim.pack_sequences


def test_engine_placement_checks():
    with pytest.raises(ConfigError, match="SGLang engine only"):
        load_config(None, ["rollout.engine=vllm", "rollout.placement=separate", "rollout.transport=disk"])
    from megatron_papo.train import check_placement

    sep = load_config(None, ["rollout.placement=separate", "rollout.transport=distributed"])
    check_placement(sep, "cpu", 4)  # CPU: the engine's processes are its own; nothing to place
    with pytest.raises(ConfigError, match="needs rollout.engine_base_gpu"):
        check_placement(sep, "cuda", 4)
    sep.rollout.engine_base_gpu = 2
    with pytest.raises(ConfigError, match="overlaps the trainer's GPUs 0..3"):
        check_placement(sep, "cuda", 4)
    sep.rollout.engine_base_gpu, sep.rollout.engine_tp = 4, 4
    if torch.cuda.device_count() < 8:
        with pytest.raises(ConfigError, match="exceeds the"):
            check_placement(sep, "cuda", 4)
    check_placement(load_config(None, []), "cuda", 8)  # colocated: shares the trainer's GPUs
    offload = load_config(None, ["optim.cpu_offload_fraction=1", "optim.use_distributed_optimizer=true"])
    check_placement(offload, "cuda", 8)
    with pytest.raises(ConfigError, match="already in host memory"):
        check_placement(offload, "cpu", 1)


def test_recipe_file_and_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"seed": 7, "optim": {"lr": 0.1}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": str(base), "optim": {"weight_decay": 0.5}}))
    cfg = load_config(str(child), ["optim.lr=0.2"])
    assert cfg.seed == 7 and cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 0.5


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="known recipes"):
        load_config("no_such_recipe_name")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["parallel.pp=2", "algo.kl_prcp_coef=0.01"])
    dump(cfg, tmp_path / "c.yaml")
    dump(cfg, tmp_path / "c.json")
    again = from_dict(Config, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg) == json.loads((tmp_path / "c.json").read_text())


def test_parallel_dims_messages():
    with pytest.raises(ConfigError) as e:
        ParallelDims(world_size=6, tp=4, pp=1).validate()
    assert "tp(4)*pp(1)*cp(1)=4 does not divide world_size 6" in str(e.value)
    assert ParallelDims(world_size=8, tp=2, pp=2).validate().dp == 2
    with pytest.raises(ConfigError, match=r"attention heads \(6\) not divisible by parallel.tp \(4\)"):
        ParallelDims(world_size=4, tp=4).check_model(num_heads=6, num_kv_heads=2, num_layers=4)


@pytest.mark.parametrize("args, fragment", [
    (["config", "parallel.tp=x"], "parallel.tp: got 'x', expected int"),
    (["config", "--config", "missing_recipe"], "recipe 'missing_recipe' not found"),
    (["config", "nosuch.key=1"], "unknown config key 'nosuch'"),
])
def test_cli_bad_input_exits_nonzero_with_one_line(args, fragment):
    proc = subprocess.run([sys.executable, "-m", "megatron_papo.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


PAPER = {
    "grpo_3b": dict(kl_prcp_coef=0.0, use_ref=True, clip_ratio_high=0.3),
    "papo_g_3b": dict(kl_prcp_coef=0.02, ori_entropy_coef=0.0, use_ref=True),
    "papo_g_7b": dict(kl_prcp_coef=0.02, ori_entropy_coef=0.05, aug_entropy_coef=0.05, use_ref=True),
    "papo_g_noref_3b": dict(kl_prcp_coef=0.01, ori_entropy_coef=0.03, use_ref=False),
    "dapo_3b": dict(kl_prcp_coef=0.0, clip_ratio_high=0.28, dynamic_sampling=True, use_ref=False),
    "papo_d_7b": dict(kl_prcp_coef=0.01, ori_entropy_coef=0.03, aug_entropy_coef=0.03, clip_ratio_high=0.28, use_ref=False),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_have_published_hyperparameters(name):
    cfg = load_config(f"{name},layouts/{'7b' if '7b' in name else '3b'}_8gpu,layouts/fp8")
    for k, v in PAPER[name].items():
        assert getattr(cfg.algo, k) == v, (name, k)
    assert (cfg.optim.lr, cfg.optim.rollout_batch_size, cfg.optim.global_batch_size) == (1e-6, 384, 128)
    assert (cfg.rollout.n, cfg.rollout.top_p, cfg.rollout.max_new_tokens, cfg.total_steps) == (5, 0.99, 2048, 202)
    assert cfg.algo.clip_ratio_dual == 3.0 and cfg.algo.loss_agg_mode == "microbatch_token_mean"
    assert (cfg.data.mask_size, cfg.data.mask_prob, cfg.data.min_pixels, cfg.data.max_pixels) == (14, 0.6, 200704, 1003520)
    assert cfg.model.fp8 == "hybrid" and cfg.parallel.tp in (2, 4)


def test_tiny_cpu_recipe_is_papo_with_reference_kl():
    cfg = load_config("tiny_cpu")
    assert cfg.model.path == "tiny" and cfg.algo.kl_prcp_coef > 0 and cfg.algo.use_ref and cfg.algo.kl_coef > 0
    assert cfg.data.train == "synthetic" and cfg.rollout.engine == "sglang"
