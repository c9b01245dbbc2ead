"""Collate layout: right padding, masks, next-token labels, pixel_values order (hand-built expectations)."""

from __future__ import annotations

import pytest
import torch

from megatron_papo.data.collate import collate_rollouts, repeat_interleave
from megatron_papo.data.processing import PromptSample


def _sample(uid: int, ids: list[int], n_patch: int, fill: float) -> PromptSample:
    return PromptSample(
        uid=uid, prompt="", prompt_ids=torch.tensor(ids), pixel_values=torch.full((n_patch, 2), fill),
        image_grid_thw=torch.tensor([[1, 2, n_patch // 2]]), images=[], answer="a",
        mm_token_type_ids=torch.tensor([1 if t == 9 else 0 for t in ids]),
    )


def test_layout_by_hand():
    a, b = _sample(3, [1, 9, 2], 4, 1.0), _sample(8, [1, 9, 9, 2, 3], 8, 2.0)
    rows = repeat_interleave([a, b], 2)
    assert [s.uid for s in rows] == [3, 3, 8, 8]
    resp = [[5, 6], torch.tensor([7]), [], [4, 4, 4]]
    aug = [torch.full((4, 2), -1.0)] * 2 + [torch.full((8, 2), -2.0)] * 2
    bt = collate_rollouts(rows, resp, pad_token_id=0, aug_pixel_values=aug, pad_to_multiple_of=4)
    assert bt.input_ids.tolist() == [
        [1, 9, 2, 5, 6, 0, 0, 0],
        [1, 9, 2, 7, 0, 0, 0, 0],
        [1, 9, 9, 2, 3, 0, 0, 0],
        [1, 9, 9, 2, 3, 4, 4, 4]]
    assert bt.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]
    assert bt.response_mask.tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0], [0] * 8, [0, 0, 0, 0, 0, 1, 1, 1]]
    assert bt.labels.tolist()[0] == [9, 2, 5, 6, 0, 0, 0, 0]
    assert bt.label_mask.tolist() == [
        [0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0], [0] * 8, [0, 0, 0, 0, 1, 1, 1, 0]]
    assert bt.mm_token_type_ids.tolist()[2] == [0, 1, 1, 0, 0, 0, 0, 0]
    assert bt.pixel_values.shape == (24, 2) and bt.pixel_values[:, 0].tolist() == [1.0] * 8 + [2.0] * 16
    assert bt.image_grid_thw.tolist() == [[1, 2, 2], [1, 2, 2], [1, 2, 4], [1, 2, 4]]
    assert bt.pixel_values_aug[:, 0].tolist() == [-1.0] * 8 + [-2.0] * 16
    assert bt.prompt_lens.tolist() == [3, 3, 5, 5] and bt.response_lens.tolist() == [2, 1, 0, 3]
    assert bt.uids.tolist() == [3, 3, 8, 8] and bt.group_index.tolist() == [0, 0, 1, 1]
    # labels at label_mask positions are exactly the response tokens
    for r in range(4):
        assert bt.labels[r][bt.label_mask[r].bool()].tolist() == bt.input_ids[r][bt.response_mask[r].bool()].tolist()


def test_group_index_separates_repeated_draws_of_one_prompt():
    a = _sample(3, [1], 2, 0.0)
    again = _sample(3, [1], 2, 0.0)  # the same prompt drawn twice in one step: two groups, one uid
    bt = collate_rollouts(repeat_interleave([a, again], 2), [[1]] * 4, 0)
    assert bt.uids.tolist() == [3, 3, 3, 3] and bt.group_index.tolist() == [0, 0, 1, 1]


def test_errors():
    a = _sample(0, [1], 2, 0.0)
    with pytest.raises(ValueError, match="one response per sample row"):
        collate_rollouts([a], [[1], [2]], 0)
    with pytest.raises(ValueError, match="masked view has shape"):
        collate_rollouts([a], [[1]], 0, aug_pixel_values=[torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="must be 1-D"):
        collate_rollouts([a], [torch.zeros(1, 2, dtype=torch.long)], 0)
