"""PAPO masked views: pixel_squares (published) and patches (merge-window aligned, equal to pixel blackening)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_papo.config.data import DataConfig
from megatron_papo.data import masking
from megatron_papo.data.collate import collate_rollouts, repeat_interleave
from megatron_papo.data.processing import encode_prompt, make_masked_view, process_images


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(1, 256, (h, w, 3), dtype=np.uint8))


def _row(uid: int, images: list, problem: str = "<image>What colour is the shape?") -> dict:
    return {"uid": uid, "problem": problem, "images": images, "answer": "red"}


def test_mask_rng_reproducible_and_distinct():
    a = masking.mask_rng(1, 5, 7).random(8)
    assert np.array_equal(a, masking.mask_rng(1, 5, 7).random(8))
    for other in [(1, 6, 7), (2, 5, 7), (1, 5, 8)]:
        assert not np.array_equal(a, masking.mask_rng(*other).random(8))
    assert np.array_equal(masking.mask_rng(1, 5, "abc").random(4), masking.mask_rng(1, 5, "abc").random(4))
    with pytest.raises(ValueError, match="seed and step must be >= 0"):
        masking.mask_rng(1, -1, 0)


def test_pixel_squares_blackens_exactly_the_drawn_squares():
    img = _noise(30, 20)  # 3 x 2 squares of 14 px, the last column/row truncated at the border
    out, grid = masking.pixel_squares(img, 0.5, 14, masking.mask_rng(0, 0, 3))
    assert grid.shape == (2, 3)
    src, arr = np.array(img), np.array(out)
    for r in range(2):
        for c in range(3):
            block, orig = arr[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14], src[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
            assert (block == 0).all() if grid[r, c] else np.array_equal(block, orig)
    # the same draws as PAPO's row-major loop of rand() < p
    rng = masking.mask_rng(0, 0, 3)
    assert np.array_equal(grid, np.array([[rng.random() < 0.5 for _ in range(3)] for _ in range(2)]))


def test_pixel_squares_fraction_close_to_p_and_rgb_first():
    img = _noise(140, 140)
    fracs = [masking.pixel_squares(img, 0.6, 14, masking.mask_rng(3, s, 0))[1].mean() for s in range(300)]
    assert abs(np.mean(fracs) - 0.6) < 0.01  # 30k Bernoulli draws: sd 0.003
    pal = Image.new("P", (28, 28))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 28, 28))
    out, grid = masking.pixel_squares(pal, 0.5, 14, masking.mask_rng(0, 0, 1))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == ((0, 0, 0) if grid[0, 0] else (10, 200, 30))


def test_black_row_is_minus_mean_over_std(processor):
    ip = processor.image_processor
    row = masking.normalized_black_row(ip)
    t, p = ip.temporal_patch_size, ip.patch_size
    expect = torch.tensor([-m / s for m, s in zip(ip.image_mean, ip.image_std)], dtype=torch.float64)
    assert row.shape == (3 * t * p * p,)
    assert torch.allclose(row.view(3, t * p * p).double(), expect[:, None].expand(3, t * p * p), atol=1e-6)


@pytest.mark.parametrize("size", [(112, 84), (56, 56), (84, 140)])
def test_patches_equal_blackening_the_pixels(processor, size):
    """Masking merge windows in pixel_values == blackening those 28x28 regions before the processor."""
    ip = processor.image_processor
    img = _noise(*size, seed=size[0])
    pv, grid = process_images(processor, [img])
    assert grid.tolist() == [[1, size[1] // 14, size[0] // 14]]  # multiple of 28: the processor does not resize
    rng = masking.mask_rng(0, 1, 2)
    aug, masks = masking.patches(pv, grid, ip, 0.5, rng)
    assert masks[0].shape == (1, size[1] // 28, size[0] // 28) and 0 < masks[0].sum() < masks[0].size
    arr = np.array(img)
    for r, c in zip(*np.nonzero(masks[0][0])):
        arr[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = 0
    ref, ref_grid = process_images(processor, [Image.fromarray(arr)])
    assert torch.equal(ref_grid, grid)
    assert torch.equal(aug, ref)
    assert not torch.equal(aug, pv)


def test_patches_two_images_and_fraction(processor):
    imgs = [_noise(56, 56, 1), _noise(112, 56, 2)]
    pv, grid = process_images(processor, imgs)
    aug, masks = masking.patches(pv, grid, processor.image_processor, 0.5, masking.mask_rng(0, 0, 0))
    arrs = [np.array(im) for im in imgs]
    for arr, m in zip(arrs, masks):
        for r, c in zip(*np.nonzero(m[0])):
            arr[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = 0
    assert torch.equal(aug, process_images(processor, [Image.fromarray(a) for a in arrs])[0])
    fr = np.mean([np.concatenate([m.ravel() for m in masking.window_mask(grid, 2, 0.3, masking.mask_rng(0, s, 0))]).mean()
                  for s in range(2000)])
    assert abs(fr - 0.3) < 0.01  # 2000 x 12 draws: sd 0.003


@pytest.mark.parametrize("mask_type", ["pixel_squares", "patches"])
def test_masked_view_invariants(processor, mask_type):
    cfg = DataConfig(format_prompt="short_answer", mask_type=mask_type, mask_prob=0.5, mask_size=14)
    sample = encode_prompt(processor, _row(11, [_noise(56, 56, 5)]), cfg, source="synthetic")
    v0 = make_masked_view(sample, cfg, seed=1, step=0, processor=processor)
    assert v0.shape == sample.pixel_values.shape and v0.dtype == sample.pixel_values.dtype
    assert not torch.equal(v0, sample.pixel_values)
    assert torch.equal(v0, make_masked_view(sample, cfg, seed=1, step=0, processor=processor))  # reproducible
    assert not torch.equal(v0, make_masked_view(sample, cfg, seed=1, step=1, processor=processor))  # new step, new mask
    assert not torch.equal(v0, make_masked_view(sample, cfg, seed=2, step=0, processor=processor))
    # identical token ids / grid: re-encoding gives the same ids, the view only replaces pixel_values
    again = encode_prompt(processor, _row(11, [_noise(56, 56, 5)]), cfg, source="synthetic")
    assert torch.equal(again.prompt_ids, sample.prompt_ids) and torch.equal(again.image_grid_thw, sample.image_grid_thw)
    # one mask per group: every row of the group carries the same masked view
    rows = repeat_interleave([sample], 4)
    views = [make_masked_view(s, cfg, seed=1, step=0, processor=processor) for s in rows]
    batch = collate_rollouts(rows, [[5, 6]] * 4, pad_token_id=0, aug_pixel_values=views)
    n = sample.pixel_values.shape[0]
    chunks = batch.pixel_values_aug.split(n)
    assert all(torch.equal(c, chunks[0]) for c in chunks) and torch.equal(chunks[0], v0)
    assert torch.equal(batch.input_ids[0], batch.input_ids[3])


def test_pixel_squares_view_extremes(processor):
    cfg = DataConfig(format_prompt="none", mask_type="pixel_squares", mask_prob=0.0)
    img = _noise(70, 42, 9)  # not a multiple of 14/28: the processor resizes, both views alike
    sample = encode_prompt(processor, _row(0, [img]), cfg, source="x.parquet")
    assert torch.equal(make_masked_view(sample, cfg, 0, 0, processor), sample.pixel_values)
    assert torch.equal(process_images(processor, sample.images)[0], sample.pixel_values)
    cfg.mask_prob = 1.0
    full = make_masked_view(sample, cfg, 0, 0, processor)
    black = masking.normalized_black_row(processor.image_processor)
    assert torch.equal(full, black.expand_as(full))


def test_both_views_run_through_the_hf_model_with_identical_positions(processor, tiny_model_dir):
    """The collated batch is valid model input; the masked view changes only the vision input."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cfg = DataConfig(format_prompt="short_answer", mask_type="patches", mask_prob=0.5)
    samples = [encode_prompt(processor, _row(u, [_noise(56, 56, u)]), cfg, source="synthetic") for u in (1, 2)]
    rows = repeat_interleave(samples, 2)
    views = [make_masked_view(s, cfg, seed=0, step=3, processor=processor) for s in rows]
    bt = collate_rollouts(rows, [[5, 6, 7], [5], [8, 9], [4, 4]], pad_token_id=processor.tokenizer.pad_token_id,
                          aug_pixel_values=views)
    common = dict(input_ids=bt.input_ids, attention_mask=bt.attention_mask, mm_token_type_ids=bt.mm_token_type_ids,
                  image_grid_thw=bt.image_grid_thw)
    pos = model.model.get_rope_index(bt.input_ids, mm_token_type_ids=bt.mm_token_type_ids,
                                     image_grid_thw=bt.image_grid_thw, attention_mask=bt.attention_mask)[0]
    with torch.no_grad():
        ori = model(pixel_values=bt.pixel_values, **common).logits
        aug = model(pixel_values=bt.pixel_values_aug, **common).logits
        # the unpadded single-row forward of row 0 agrees with the padded batch (right padding is harmless)
        n0 = int(bt.attention_mask[0].sum())
        single = model(input_ids=bt.input_ids[:1, :n0], attention_mask=bt.attention_mask[:1, :n0],
                       mm_token_type_ids=bt.mm_token_type_ids[:1, :n0], image_grid_thw=bt.image_grid_thw[:1],
                       pixel_values=bt.pixel_values[:16]).logits
    assert pos.shape[0] == 3  # M-RoPE (t, h, w) ids depend on ids/grid/mask only, shared by both views
    assert ori.shape == aug.shape
    m = bt.label_mask.bool()
    assert not torch.allclose(ori[m], aug[m])
    assert torch.allclose(single[0], ori[0, :n0], atol=1e-5)
