"""The one HF mapping: names (checkpoint and transformers-5), TP layouts, shard/merge round trips, bad checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_papo.models.qwen2_5_vl import build_plan, load_arch, shards_to_hf, to_checkpoint_name, to_transformers_name
from megatron_papo.models.qwen2_5_vl.hf_adapter import (
    Kind,
    SafetensorsReader,
    bucketize,
    check_checkpoint,
    checkpoint_shapes,
    hf_to_shard,
)


def _random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _reader(state):
    return lambda name, a, b, dim: state[name][a:b] if dim == 0 else state[name][:, a:b]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_untied_dir"])
def test_checkpoint_names_and_shapes_equal_save_pretrained(fixture, request):
    hf_dir = request.getfixturevalue(fixture)
    reader = SafetensorsReader(hf_dir)
    assert checkpoint_shapes(load_arch(hf_dir)) == {n: reader.shape(n) for n in reader.where}


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_untied_dir"])
def test_transformers_in_memory_names(fixture, request):
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    hf_dir = request.getfixturevalue(fixture)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(hf_dir))
    in_memory = {n for n, _ in model.named_parameters()}  # tied lm_head is not a separate parameter
    ckpt = set(checkpoint_shapes(load_arch(hf_dir)))
    assert {to_transformers_name(n) for n in ckpt} == in_memory
    assert {to_checkpoint_name(n) for n in in_memory} == ckpt
    assert to_checkpoint_name("visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"


@pytest.mark.parametrize("name", ["tiny_model_dir", "Qwen2.5-VL-7B"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_merge_is_bit_exact(name, tp, request):
    arch = load_arch(request.getfixturevalue(name) if name.startswith("tiny") else name)
    plan = [s for s in build_plan(arch, 2) if s.export]
    if not name.startswith("tiny"):  # real sizes: one layer of each kind is enough (memory)
        plan = [s for s in plan if ".0." in s.mcore or "layers" not in s.mcore and "embed" not in s.mcore
                and "output" not in s.mcore]
    state = _random_state({n: sh for s in plan for n, sh in zip(s.hf, s.hf_shapes)})
    for spec in plan:
        shards = [hf_to_shard(spec, _reader(state), r, tp) for r in range(tp)]
        assert len({tuple(s.shape) for s in shards}) == 1, spec.mcore
        merged = shards_to_hf(spec, shards)
        assert set(merged) == set(spec.hf)
        for n in spec.hf:
            assert torch.equal(merged[n], state[n]), (spec.mcore, n, tp)


def test_qkv_layout_is_interleaved_per_gqa_group_and_fc1_is_gate_up_per_rank(tiny_model_dir):
    arch = load_arch(tiny_model_dir)  # 4 heads, 2 kv heads, head_dim 32 -> 2 q heads per group
    plan = {s.mcore: s for s in build_plan(arch)}
    qkv = plan["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    fc1 = plan["language_model.decoder.layers.0.mlp.linear_fc1.weight"]
    state = _random_state({n: sh for s in (qkv, fc1) for n, sh in zip(s.hf, s.hf_shapes)})
    q, k, v = (state[n] for n in qkv.hf)
    d = 32
    for r in range(2):  # TP=2: rank r holds kv group r: [q_2r, q_2r+1, k_r, v_r]
        expect = torch.cat([q[2 * r * d:(2 * r + 2) * d], k[r * d:(r + 1) * d], v[r * d:(r + 1) * d]])
        assert torch.equal(hf_to_shard(qkv, _reader(state), r, 2), expect)
    for r in range(4):  # TP=4 > 2 kv groups: each rank holds a contiguous half of one group's block
        group = torch.cat([q[(r // 2) * 2 * d:(r // 2 + 1) * 2 * d], k[(r // 2) * d:(r // 2 + 1) * d],
                           v[(r // 2) * d:(r // 2 + 1) * d]])
        half = group.shape[0] // 2
        assert torch.equal(hf_to_shard(qkv, _reader(state), r, 4), group[(r % 2) * half:(r % 2 + 1) * half])
    gate, up = (state[n] for n in fc1.hf)
    for r in range(2):
        assert torch.equal(hf_to_shard(fc1, _reader(state), r, 2), torch.cat([gate[r * 128:(r + 1) * 128],
                                                                               up[r * 128:(r + 1) * 128]]))


def test_vision_fused_qkv_maps_to_mcore_head_interleave(tiny_model_dir):
    arch = load_arch(tiny_model_dir)  # vision: 4 heads of 16
    spec = {s.mcore: s for s in build_plan(arch)}["vision.layers.0.self_attention.linear_qkv.weight"]
    assert spec.kind == Kind.FUSED_QKV
    state = _random_state(dict(zip(spec.hf, spec.hf_shapes)))
    w = state[spec.hf[0]]
    q, k, v = w[:64], w[64:128], w[128:]
    full = hf_to_shard(spec, _reader(state), 0, 1)
    for h in range(4):
        blk = full[h * 48:(h + 1) * 48]
        assert torch.equal(blk, torch.cat([q[h * 16:(h + 1) * 16], k[h * 16:(h + 1) * 16], v[h * 16:(h + 1) * 16]]))


def test_pp_stages_and_tied_output_copy(tiny_untied_dir, tiny_model_dir):
    plan = build_plan(load_arch(tiny_untied_dir), 2)
    stage = {s.mcore: s.stage for s in plan}
    assert stage["language_model.decoder.layers.1.mlp.linear_fc2.weight"] == 0
    assert stage["language_model.decoder.layers.2.mlp.linear_fc2.weight"] == 1
    assert stage["vision.merger.linear_fc2.bias"] == 0 and stage["language_model.output_layer.weight"] == 1
    tied = {s.mcore: s for s in build_plan(load_arch(tiny_model_dir), 2)}
    out = tied["language_model.output_layer.weight"]
    assert out.hf == ("model.embed_tokens.weight",) and out.export is False and out.stage == 1
    assert "language_model.output_layer.weight" not in {s.mcore for s in build_plan(load_arch(tiny_model_dir), 1)}


def test_bad_checkpoint_lists_missing_extra_and_misshaped_names(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    f = next(bad.glob("*.safetensors"))
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["visual.blocks.0.attn.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.zeros(7)
    save_file(state, str(f), metadata={"format": "pt"})
    reader = SafetensorsReader(bad)
    with pytest.raises(ValueError) as e:
        check_checkpoint(load_arch(bad), {n: reader.shape(n) for n in reader.where})
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): visual.blocks.0.attn.extra.weight" in msg
    assert "mis-shaped (1): model.norm.weight: [7] != expected [128]" in msg


def test_transformers_state_dict_names_are_accepted(tiny_model_dir):
    reader = SafetensorsReader(tiny_model_dir)
    shapes = {to_transformers_name(n): reader.shape(n) for n in reader.where}
    check_checkpoint(load_arch(tiny_model_dir), {to_checkpoint_name(n): s for n, s in shapes.items()})


def test_bucketize_keeps_order_and_respects_the_limit(tiny_model_dir):
    plan = [s for s in build_plan(load_arch(tiny_model_dir)) if s.export]
    buckets = bucketize(plan, max_bytes=200_000, bytes_per_element=4)
    assert [s for b in buckets for s in b] == plan and len(buckets) > 1
    for b in buckets:
        sizes = [4 * sum(torch.Size(x).numel() for x in s.hf_shapes) for s in b]
        assert len(b) == 1 or sum(sizes) <= 200_000
