"""Every recipe x layout the README shows resolves, fits its GPU count, and builds its mcore TransformerConfigs.

The configs are built exactly as a GPU run builds them (``build.transformer_configs`` with the recipe's dtype on a
CUDA device: ``use_cpu_initialization=False``, FP8 fields from ``specs.precision_kwargs``), so mcore's own
validation (``TransformerConfig.__post_init__``, which needs no Transformer Engine for these checks) runs on each.
The models themselves are built on the meta device in ``tests/distributed/test_recipe_meta.py``.
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron_papo.config import load_config
from megatron_papo.config.model import ModelConfig
from megatron_papo.models.qwen2_5_vl import load_arch, resolve_dtype
from megatron_papo.models.qwen2_5_vl.build import transformer_configs
from megatron_papo.models.qwen2_5_vl.config import ModelConfigError, lm_transformer_config
from megatron_papo.models.qwen2_5_vl.specs import precision_kwargs
from megatron_papo.parallel.dims import ParallelDims
from tests.harness import REPO
from tests.recipes import PUBLISHED, README_EXAMPLE, cluster_recipes, combinations, gpus_of, size_of

COMBOS = combinations()


def test_the_combinations_are_the_readme_ones():
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"`([a-z0-9_]+_[37]b)`", readme))
    assert named == set(cluster_recipes()), (named, cluster_recipes())
    assert README_EXAMPLE in readme and README_EXAMPLE in COMBOS
    assert len(COMBOS) == 60  # 10 recipes x 3 layouts x (bf16, fp8)


@pytest.mark.parametrize("combo", COMBOS)
def test_recipe_layout_builds_its_transformer_configs(combo):
    cfg = load_config(combo)
    recipe, layout = combo.split(",")[:2]
    fp8 = combo.endswith("layouts/fp8")
    size = size_of(recipe)
    assert cfg.model.path.rstrip("/").split("/")[-1].startswith(PUBLISHED[size]), cfg.model.path
    arch = load_arch(PUBLISHED[size])
    p = cfg.parallel
    dims = ParallelDims(world_size=gpus_of(layout), tp=p.tp, pp=p.pp).validate()
    dims.check_model(num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, num_layers=arch.num_layers,
                     vision_heads=arch.vision.num_heads)
    dtype = resolve_dtype(cfg.model.dtype, torch.device("cuda"))
    lm, vis = transformer_configs(cfg.model, arch, tp=p.tp, pp=p.pp, sequence_parallel=p.sequence_parallel,
                                  dtype=dtype, use_cpu_init=False)
    assert lm.bf16 and lm.params_dtype == torch.bfloat16 and lm.transformer_impl == "transformer_engine"
    assert (lm.tensor_model_parallel_size, lm.pipeline_model_parallel_size) == (p.tp, p.pp)
    assert lm.sequence_parallel == (p.sequence_parallel and p.tp > 1)
    assert lm.recompute_granularity == {"none": None, "selective": "selective", "full": "full"}[cfg.model.recompute]
    assert vis.fp8 is None and vis.tensor_model_parallel_size == p.tp  # the vision tower stays in bf16
    if not fp8:
        assert lm.fp8 is None
        return
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    assert (lm.fp8, lm.fp8_recipe, lm.fp8_param) == ("hybrid", "tensorwise", False)
    bf16_layers = [i for i in range(arch.num_layers) if is_first_last_bf16_layer(lm, i)]
    assert bf16_layers == [0, arch.num_layers - 1]  # mcore runs these two outside the FP8 context


# --- specs.precision_kwargs rejects exactly what mcore's TransformerConfig rejects ----------------------------
FP8_CASES = [(fmt, recipe, n, pp, gather) for fmt in ("e4m3", "hybrid")
             for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8")
             for n in (0, 1, 2, 3) for pp in (1, 2) for gather in (False, True)]


def _mcore_accepts(arch, pp: int, **raw) -> bool:
    try:
        lm_transformer_config(arch, tp=1, pp=pp, dtype=torch.bfloat16, extra={"transformer_impl": "transformer_engine",
                                                                           **raw})
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("fmt, recipe, n, pp, gather", FP8_CASES)
def test_precision_kwargs_and_mcore_accept_the_same_fp8_settings(tiny_untied_dir, fmt, recipe, n, pp, gather):
    arch = load_arch(tiny_untied_dir)  # 4 layers: 2 per stage at pp=2, so n=3 exceeds a stage
    mc = ModelConfig(transformer_impl="transformer_engine", fp8=fmt, fp8_recipe=recipe, fp8_bf16_first_last_layers=n,
                     fp8_param_gather=gather)
    try:
        kw = precision_kwargs(mc, arch.num_layers, pp)
        ours = True
    except ModelConfigError:
        ours = False
    raw = dict(fp8=fmt, fp8_recipe=recipe, fp8_param=gather, first_last_layers_bf16=n > 0,
               num_layers_at_start_in_bf16=n, num_layers_at_end_in_bf16=n)
    assert ours == _mcore_accepts(arch, pp, **raw), (fmt, recipe, n, pp, gather)
    if ours:
        assert {k: kw[k] for k in raw} == raw  # what we check is what we pass


def test_fp8_param_gather_without_fp8_rejected_by_both(tiny_untied_dir):
    arch = load_arch(tiny_untied_dir)
    with pytest.raises(ModelConfigError, match="fp8_param_gather"):
        precision_kwargs(ModelConfig(transformer_impl="transformer_engine", fp8_param_gather=True), arch.num_layers)
    assert not _mcore_accepts(arch, 1, fp8=None, fp8_param=True)


def test_fp8_defaults_start():
    """``model.fp8=hybrid`` on its own (default recipe and bf16 first/last layer) is a setting mcore accepts."""
    mc = ModelConfig(transformer_impl="transformer_engine", fp8="hybrid")
    kw = precision_kwargs(mc, 28, 1)
    lm_transformer_config(load_arch(PUBLISHED["7b"]), tp=4, sequence_parallel=True, dtype=torch.bfloat16,
                          use_cpu_init=False, extra=kw)
