"""M-RoPE position ids: ours equal transformers' ``get_rope_index`` (several images of different sizes, text-only rows, padding)."""

from __future__ import annotations

import pytest
import torch

from megatron_papo.models.qwen2_5_vl import get_rope_index, load_arch
from megatron_papo.models.qwen2_5_vl.parity import builtin_samples, make_batch


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoConfig, Qwen2_5_VLModel

    with torch.device("meta"):
        return Qwen2_5_VLModel(AutoConfig.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _ours(arch, batch):
    return get_rope_index(batch["input_ids"], image_token_id=arch.image_token_id, video_token_id=arch.video_token_id,
                          spatial_merge_size=arch.vision.spatial_merge_size, image_grid_thw=batch.get("image_grid_thw"),
                          attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("order", [[0, 1, 2], [1, 2, 0], [2, 0]])
def test_matches_transformers(tiny_model_dir, hf_model, processor, side, order):
    samples = [builtin_samples()[i] for i in order]
    batch = make_batch(processor, samples, side)
    ref_pos, ref_delta = hf_model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                 image_grid_thw=batch["image_grid_thw"],
                                                 attention_mask=batch["attention_mask"])
    pos, delta = _ours(load_arch(tiny_model_dir), batch)
    assert torch.equal(pos, ref_pos.cpu())
    assert torch.equal(delta.view(-1), ref_delta.view(-1).cpu())
    assert int(pos.max()) < int(batch["attention_mask"].sum(1).max())  # images compress positions


def test_text_only_rows_are_arange_over_real_tokens(tiny_model_dir, processor):
    batch = make_batch(processor, [builtin_samples()[1], {**builtin_samples()[1], "response": "no"}], "left")
    pos, delta = _ours(load_arch(tiny_model_dir), batch)
    am = batch["attention_mask"].bool()
    for b in range(2):
        n = int(am[b].sum())
        assert torch.equal(pos[:, b, am[b]], torch.arange(n).expand(3, n))
        assert int(pos[:, b, ~am[b]].abs().sum()) == 0
    assert delta.view(-1).tolist() == [0, 0]


def test_grid_mismatch_is_an_error(tiny_model_dir, processor):
    batch = make_batch(processor, [builtin_samples()[2]])
    with pytest.raises(ValueError, match="does not match grid"):
        get_rope_index(batch["input_ids"], image_token_id=load_arch(tiny_model_dir).image_token_id, video_token_id=-1,
                       spatial_merge_size=2, image_grid_thw=torch.tensor([[1, 4, 4]]))
