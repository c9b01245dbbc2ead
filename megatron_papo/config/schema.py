"""The top-level ``Config`` and recipe loading (YAML file + ``key.sub=value`` overrides)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from megatron_papo.config.algo import AlgoConfig
from megatron_papo.config.base import ConfigError, field, from_dict, load_yaml, merge_override, parse_override
from megatron_papo.config.checkpoint import CheckpointConfig
from megatron_papo.config.data import DataConfig
from megatron_papo.config.logging import LoggingConfig
from megatron_papo.config.model import ModelConfig
from megatron_papo.config.numeric import check_numbers
from megatron_papo.config.optim import OptimConfig
from megatron_papo.config.parallel import ParallelConfig
from megatron_papo.config.rollout import RolloutConfig, check_engine_kwargs

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "launch" / "configs"


@dataclass
class Config:
    """Everything a run needs; one owner per knob."""

    run_dir: str = field("runs/default", help="output directory: config, logs, metrics, tensorboard, checkpoints")
    seed: int = field(1, help="global seed (model init, sampling, masks)")
    total_steps: int = field(202, help="training steps (one rollout batch each)")
    mode: Literal["train", "rollout_only", "train_from_rollouts"] = field(
        "train", help="debug modes: rollout only (saves rollouts), or train from saved rollouts")
    rollouts_dir: Optional[str] = field(None, help="where rollout_only saves and train_from_rollouts reads")
    eval_at_end: bool = field(True, help="evaluate the test split after training (avg accuracy, majority baseline)")
    eval_every: int = field(0, help="evaluate every N steps; 0 = only at the end")
    eval_n: int = field(1, help="samples per test question in evaluation (avg@n)")
    eval_datasets: list[str] = field(
        default_factory=list, help="validation benchmarks as name=source entries (source: 'synthetic' = the synthetic "
        "test split, a PAPO_eval-style .parquet/.jsonl file or a dataset dir); metrics eval/<name>/accuracy etc., "
        "eval/accuracy = their macro average; empty = one benchmark 'test' from data.test")
    eval_temperature: Optional[float] = field(None, help="sampling temperature of evaluation; null = rollout.temperature, 0 = greedy")
    check_invariants: bool = field(True, help="assert first-step invariants (actor==ref logprobs, ratio==1)")
    check_invariants_tol: Optional[float] = field(
        None, help="tolerance of the invariants; null = from the compute dtype (fp32 1e-5; bf16 0.125 max gap / "
        "0.0078 mean; FP8 2.0 / 0.125, see megatron_papo/invariants.py)")
    parallel: ParallelConfig = field(default_factory=ParallelConfig, help="parallel layout")
    model: ModelConfig = field(default_factory=ModelConfig, help="model")
    rollout: RolloutConfig = field(default_factory=RolloutConfig, help="rollout engine")
    algo: AlgoConfig = field(default_factory=AlgoConfig, help="algorithm")
    data: DataConfig = field(default_factory=DataConfig, help="data")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer")
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, help="checkpointing")
    logging: LoggingConfig = field(default_factory=LoggingConfig, help="logging")


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe is a YAML path, or a name looked up in launch/configs/ (``tiny_cpu``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file '{p}' does not exist; pass a path or a name from {RECIPE_DIR}")
        return p
    cand = RECIPE_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        known = sorted(x.stem for x in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []
        raise ConfigError(f"recipe '{name_or_path}' not found in {RECIPE_DIR}; known recipes: {', '.join(known) or 'none'}")
    return cand


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a recipe; a top-level ``base: other_recipe`` is loaded first and overlaid."""
    if path.resolve() in seen:
        raise ConfigError(f"recipe '{path}' includes itself through 'base'")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _load_with_bases(resolve_recipe(base) if not Path(base).is_absolute() else Path(base),
                              seen + (path.resolve(),))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_config(recipe: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Recipe(s) + overrides → validated ``Config``. Raises ConfigError with one line.

    ``recipe`` may layer several files left to right: ``papo_g_7b,layouts/7b_8gpu,layouts/fp8``.
    """
    data: dict[str, Any] = {}
    for name in (recipe.split(",") if recipe else []):
        _deep_update(data, _load_with_bases(resolve_recipe(name.strip())))
    for text in overrides:
        path, value = parse_override(text)
        merge_override(data, path, value)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that need no process group (world-size checks live in parallel/)."""
    a, o, r = cfg.algo, cfg.optim, cfg.rollout
    check_numbers(cfg)  # finite, and in range (config/numeric.py)
    if r.n < 1:
        raise ConfigError(f"rollout.n={r.n} must be >= 1")
    if a.adv_estimator in ("grpo", "dapo", "rloo") and r.n < 2:
        raise ConfigError(f"algo.adv_estimator={a.adv_estimator} needs rollout.n >= 2 (got {r.n}): group baselines")
    if o.rollout_batch_size % o.global_batch_size:
        raise ConfigError(
            f"optim.rollout_batch_size ({o.rollout_batch_size}) must be a multiple of optim.global_batch_size "
            f"({o.global_batch_size})")
    if a.kl_coef > 0 and not a.use_ref and a.kl_coef != AlgoConfig.kl_coef:
        raise ConfigError(f"algo.kl_coef={a.kl_coef} has no effect with algo.use_ref=false; set algo.kl_coef=0")
    if a.aug_entropy_coef > 0 and a.kl_prcp_coef <= 0:
        raise ConfigError("algo.aug_entropy_coef > 0 needs the masked view: set algo.kl_prcp_coef > 0")
    if a.overlong_buffer > r.max_new_tokens:
        raise ConfigError(f"algo.overlong_buffer={a.overlong_buffer} exceeds rollout.max_new_tokens={r.max_new_tokens} "
                          "(the buffer is the last part of the allowed length); lower it or set it to 0 (off)")
    if cfg.model.logits_chunk_size < 0:
        raise ConfigError(f"model.logits_chunk_size={cfg.model.logits_chunk_size} must be >= 0 (0 = unchunked)")
    if cfg.model.fp8 is not None and cfg.model.transformer_impl != "transformer_engine":
        raise ConfigError(f"model.fp8={cfg.model.fp8} needs model.transformer_impl=transformer_engine")
    if r.placement == "separate" and r.transport == "tensor":
        raise ConfigError("rollout.placement=separate needs rollout.transport=distributed or disk (the tensor "
                          "transport shares memory with the engine)")
    if r.placement == "separate" and r.engine != "sglang":
        raise ConfigError(f"rollout.placement=separate is implemented for the SGLang engine only (got {r.engine})")
    check_engine_kwargs(r.engine, r.engine_kwargs)
    if r.num_engines < 0 or (r.placement == "colocated" and r.num_engines):
        raise ConfigError(f"rollout.num_engines={r.num_engines}: colocated fleets have one engine per rollout.engine_tp "
                          "ranks (set 0); placement=separate takes a count >= 0")
    if r.server_urls and (r.placement != "separate" or r.mode != "server"):
        raise ConfigError(f"rollout.server_urls={r.server_urls} are external servers: set rollout.placement=separate "
                          "and rollout.mode=server")
    if r.placement == "colocated" and r.engine_base_gpu >= 0:
        raise ConfigError(f"rollout.engine_base_gpu={r.engine_base_gpu} is for placement=separate; colocated engines "
                          "use the trainer's devices")
    _validate_async(cfg)
    if o.micro_batch_tokens < 0:
        raise ConfigError(f"optim.micro_batch_tokens={o.micro_batch_tokens} must be >= 0 (0 = fixed micro_batch_size)")
    if o.micro_batch_tokens > 0 and cfg.parallel.pp > 1:
        raise ConfigError("optim.micro_batch_tokens > 0 gives micro-batches of varying shape; pipeline parallelism "
                          "(parallel.pp > 1) needs fixed ones: set optim.micro_batch_tokens=0")
    if o.pack_sequences and o.micro_batch_tokens <= 0:
        raise ConfigError("optim.pack_sequences=true needs optim.micro_batch_tokens > 0 (tokens per micro-batch of packed rows)")
    if o.pack_sequences and cfg.model.transformer_impl != "local":
        raise ConfigError("optim.pack_sequences=true needs model.transformer_impl=local (packed attention with "
                          "Transformer Engine's THD layout is not wired up)")
    if not 0.0 <= o.cpu_offload_fraction <= 1.0:
        raise ConfigError(f"optim.cpu_offload_fraction={o.cpu_offload_fraction} must be in [0, 1]")
    if o.cpu_offload_fraction > 0 and not o.use_distributed_optimizer:
        raise ConfigError("optim.cpu_offload_fraction > 0 needs optim.use_distributed_optimizer=true")
    if o.cpu_offload_fraction > 0 and cfg.model.fp8_param_gather and cfg.model.fp8_recipe != "delayed":
        raise ConfigError(f"optim.cpu_offload_fraction > 0 with model.fp8_param_gather=true needs model.fp8_recipe="
                          f"delayed (got {cfg.model.fp8_recipe}); set model.fp8_param_gather=false")
    _validate_lr_schedule(cfg)
    _validate_eval_datasets(cfg.eval_datasets)
    from megatron_papo.utils.trackers import check_backends

    check_backends(cfg.logging.backends)
    if not 0.0 <= cfg.data.mask_prob <= 1.0:
        raise ConfigError(f"data.mask_prob={cfg.data.mask_prob} must be in [0, 1]")


def _validate_async(cfg: Config) -> None:
    """``rollout.async_steps``: 0 or 1, and only where generation can overlap training."""
    r = cfg.rollout
    if r.async_steps not in (0, 1):
        raise ConfigError(f"rollout.async_steps={r.async_steps}: expected 0 (generate, then train) or 1 (one step ahead)")
    if not r.async_steps:
        return
    if r.placement != "separate":
        raise ConfigError("rollout.async_steps=1 needs rollout.placement=separate: colocated engines share the trainer's "
                          "devices, so generation cannot overlap training; set rollout.async_steps=0")
    if cfg.mode != "train":
        raise ConfigError(f"rollout.async_steps=1 overlaps generation with training; mode={cfg.mode} does not do both: "
                          "set rollout.async_steps=0")
    if cfg.algo.dynamic_sampling:
        raise ConfigError("rollout.async_steps=1 with algo.dynamic_sampling=true: DAPO refills draw again after filtering "
                          "on this step's rewards, which a batch generated a step ahead cannot do; set one of them off")


def _validate_lr_schedule(cfg: Config) -> None:
    from megatron_papo.config.optim import lr_schedule_steps

    o = cfg.optim
    if o.lr_warmup_steps < 0:
        raise ConfigError(f"optim.lr_warmup_steps={o.lr_warmup_steps} must be >= 0")
    if not 0.0 <= o.lr_warmup_ratio < 1.0:
        raise ConfigError(f"optim.lr_warmup_ratio={o.lr_warmup_ratio} must be in [0, 1)")
    if o.lr_warmup_steps and o.lr_warmup_ratio:
        raise ConfigError("optim.lr_warmup_steps and optim.lr_warmup_ratio are both set; keep one (the other = 0)")
    if not 0.0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if o.lr_decay_steps is not None and o.lr_decay_steps < 1:
        raise ConfigError(f"optim.lr_decay_steps={o.lr_decay_steps} must be >= 1 (or null = total_steps)")
    warmup, decay = lr_schedule_steps(o, cfg.total_steps)
    if o.lr_decay != "constant" and warmup >= decay:
        raise ConfigError(f"optim: warmup ({warmup} steps) must end before the {o.lr_decay} decay does "
                          f"(lr_decay_steps={decay}); lower the warmup or raise optim.lr_decay_steps")


def _validate_eval_datasets(entries: Sequence[str]) -> None:
    from megatron_papo.evaluate import parse_benchmarks

    parse_benchmarks(entries, default_source="synthetic")
