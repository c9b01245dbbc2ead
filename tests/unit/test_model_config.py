"""Qwen2.5-VL config mapping: HF config → arch → mcore TransformerConfigs; parallel checks; FP8/recompute mapping."""

from __future__ import annotations

import pytest
import torch

from megatron_papo.config.model import ModelConfig
from megatron_papo.models.qwen2_5_vl.config import (
    PUBLISHED_CONFIGS,
    ModelConfigError,
    lm_transformer_config,
    load_arch,
    validate_parallel,
    vision_transformer_config,
)
from megatron_papo.models.qwen2_5_vl.specs import lm_layer_spec, precision_kwargs, vision_layer_spec


def test_arch_from_tiny_matches_transformers_config(tiny_untied_dir):
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(tiny_untied_dir)
    a = load_arch(tiny_untied_dir)
    assert (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads) == (128, 4, 4, 2)
    assert a.tie_word_embeddings is False and a.vocab_size == hf.text_config.vocab_size
    assert list(a.mrope_section) == hf.text_config.rope_parameters["mrope_section"]
    assert a.image_token_id == hf.image_token_id and a.vision.fullatt_block_indexes == (1,)


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_configs_parse(name):
    a = load_arch(name)
    assert a.mrope_section == (16, 24, 24) and a.head_dim == 128
    assert a.vision.depth == 32 and a.vision.fullatt_block_indexes == (7, 15, 23, 31)
    assert a.tie_word_embeddings == (name == "Qwen2.5-VL-3B")


def test_lm_and_vision_transformer_configs(tiny_model_dir):
    a = load_arch(tiny_model_dir)
    lm = lm_transformer_config(a, tp=2, pp=2, sequence_parallel=True)
    assert (lm.num_query_groups, lm.kv_channels, lm.ffn_hidden_size) == (2, 32, 256)
    assert lm.add_qkv_bias and not lm.add_bias_linear and lm.gated_linear_unit and lm.normalization == "RMSNorm"
    assert lm.mrope_section == [4, 6, 6] and lm.sequence_parallel and lm.layernorm_epsilon == 1e-6
    vis = vision_transformer_config(a, tp=2)
    assert vis.add_bias_linear and vis.add_qkv_bias and vis.num_query_groups == 4
    assert vis.pipeline_model_parallel_size == 1 and not vis.sequence_parallel
    assert lm_transformer_config(a, tp=1, sequence_parallel=True).sequence_parallel is False  # SP needs TP>1


def test_heads_not_divisible_by_tp_names_both_numbers():
    a = load_arch("Qwen2.5-VL-7B")  # 28 heads, 4 kv heads
    with pytest.raises(ModelConfigError, match=r"num_attention_heads \(28\).*parallel\.tp \(8\)"):
        validate_parallel(a, 8, 1)
    with pytest.raises(ModelConfigError, match=r"num_attention_heads \(28\).*parallel\.tp \(3\)"):
        lm_transformer_config(a, tp=3)
    with pytest.raises(ModelConfigError, match=r"num_hidden_layers \(28\).*parallel\.pp \(3\)"):
        validate_parallel(a, 1, 3)
    validate_parallel(a, 4, 4)


def test_fp8_mapping_onto_transformer_config(tiny_untied_dir):
    cfg = ModelConfig(transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="tensorwise",
                      fp8_param_gather=True, fp8_bf16_first_last_layers=1)
    kw = precision_kwargs(cfg, num_layers=4, pp=1)
    assert kw == {"transformer_impl": "transformer_engine", "fp8": "hybrid", "fp8_recipe": "tensorwise",
                  "fp8_param": True, "first_last_layers_bf16": True, "num_layers_at_start_in_bf16": 1,
                  "num_layers_at_end_in_bf16": 1}
    tc = lm_transformer_config(load_arch(tiny_untied_dir), dtype=torch.bfloat16, extra=kw)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param, tc.first_last_layers_bf16) == ("hybrid", "tensorwise", True, True)
    kw = precision_kwargs(ModelConfig(transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="mxfp8",
                                      fp8_bf16_first_last_layers=0), num_layers=4)
    assert kw["fp8"] == "e4m3" and kw["first_last_layers_bf16"] is False and kw["fp8_param"] is False
    assert precision_kwargs(ModelConfig(), num_layers=4) == {"transformer_impl": "local"}


@pytest.mark.parametrize("bad, match", [
    (dict(fp8="e4m3"), r"model\.fp8=e4m3 needs model\.transformer_impl=transformer_engine"),
    (dict(transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="delayed"), r"fp8_recipe=delayed"),
    (dict(transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="blockwise", fp8_bf16_first_last_layers=3),
     r"fp8_bf16_first_last_layers \(3\) exceeds .* \(2\)"),
    (dict(fp8_param_gather=True), r"fp8_param_gather=true needs model\.fp8"),
])
def test_fp8_bad_settings_fail_naming_the_field(bad, match):
    with pytest.raises(ModelConfigError, match=match):
        precision_kwargs(ModelConfig(**bad), num_layers=4, pp=2)


def test_recompute_mapping():
    assert precision_kwargs(ModelConfig(recompute="full"), 4)["recompute_granularity"] == "full"
    assert precision_kwargs(ModelConfig(recompute="selective"), 4)["recompute_granularity"] == "selective"


def test_transformer_engine_missing_is_one_clear_line():
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine is installed here")
    except Exception:
        pass
    for fn in (lm_layer_spec, vision_layer_spec):
        with pytest.raises(ModelConfigError) as e:
            fn("transformer_engine")
        assert "\n" not in str(e.value) and "transformer_impl=local" in str(e.value)


def test_local_specs_build():
    from megatron_papo.models.qwen2_5_vl.specs import SDPACoreAttention, VisionCoreAttention

    assert lm_layer_spec("local").submodules.self_attention.submodules.core_attention is SDPACoreAttention
    assert vision_layer_spec("local").submodules.self_attention.submodules.core_attention is VisionCoreAttention
