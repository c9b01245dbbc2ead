"""PAPO's masked view: ``pixel_squares`` (published) and ``patches`` (merge-window aligned).

- ``pixel_squares`` (papo_spec §4.1): walk the decoded RGB image at its original resolution in
  ``size``-px squares from (0, 0) (border squares truncated) and blacken each one independently with
  probability ``prob``. Applied before PAPO's resize and the processor, so the mask is generally not
  aligned with the ViT grid. Each image of a prompt gets its own mask.
- ``patches``: blacken whole 2x2 merge windows (28x28 px after the processor's resize) directly in
  ``pixel_values`` by writing the processor's normalised black row. Qwen2VLImageProcessor lays out
  ``pixel_values`` per image as rows ordered ``(t, h//merge, w//merge, merge_h, merge_w)``, each row
  ``C * T * P * P`` values (channel-major, then temporal copy, then the P x P pixels), so merge
  window ``k`` of an image is the ``merge**2`` consecutive rows starting at ``k * merge**2``.
  This equals blackening those pixels before normalisation (tested against the processor).

Randomness: :func:`mask_rng` is a numpy Generator seeded by ``(seed, step, uid)`` — reproducible, one
mask per prompt and step (all ``n`` samples of the prompt share it), a fresh one every step.
"""

from __future__ import annotations

import hashlib
from typing import Any, Union

import numpy as np
import torch
from PIL import Image


def _uid_int(uid: Union[int, str]) -> int:
    if isinstance(uid, (int, np.integer)) and not isinstance(uid, bool):
        if uid < 0:
            raise ValueError(f"mask seed: uid must be >= 0, got {uid}")
        return int(uid)
    return int.from_bytes(hashlib.sha256(str(uid).encode()).digest()[:8], "little")


def mask_rng(seed: int, step: int, uid: Union[int, str]) -> np.random.Generator:
    """The Generator for prompt ``uid`` at training ``step`` (seed/step must be >= 0; str uids are hashed)."""
    if seed < 0 or step < 0:
        raise ValueError(f"mask seed: seed and step must be >= 0, got seed={seed} step={step}")
    return np.random.default_rng([int(seed), int(step), _uid_int(uid)])


def square_mask(height: int, width: int, prob: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Bool ``[ceil(H/size), ceil(W/size)]``: True = blacken that square (row-major draws, like PAPO's loop)."""
    rows, cols = -(-height // size), -(-width // size)
    return rng.random((rows, cols)) < prob


def pixel_squares(image: Image.Image, prob: float, size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Blacken ``size``-px squares of an image (converted to RGB first); returns (masked image, square mask)."""
    img = image if image.mode == "RGB" else image.convert("RGB")
    arr = np.array(img, dtype=np.uint8)  # copy
    grid = square_mask(img.height, img.width, prob, size, rng)
    pix = np.repeat(np.repeat(grid, size, axis=0), size, axis=1)[: img.height, : img.width]
    arr[pix] = 0
    return Image.fromarray(arr), grid


_BLACK_CACHE: dict[int, tuple[Any, torch.Tensor]] = {}


def normalized_black_row(image_processor: Any) -> torch.Tensor:
    """One ``pixel_values`` row of an all-black patch, computed by running the processor itself.

    Equals ``-mean_c / std_c`` per channel (after the processor's fused rescale), repeated T*P*P times.
    """
    key = id(image_processor)
    hit = _BLACK_CACHE.get(key)
    if hit is not None and hit[0] is image_processor:
        return hit[1]
    side = image_processor.patch_size * image_processor.merge_size
    out = image_processor(images=[Image.new("RGB", (side, side))], do_resize=False, return_tensors="pt")
    rows = out["pixel_values"]
    if not torch.equal(rows, rows[:1].expand_as(rows)):
        raise RuntimeError("image processor: rows of an all-black image differ; pixel_values layout is not the expected one")
    row = rows[0].clone()
    _BLACK_CACHE[key] = (image_processor, row)
    return row


def window_mask(image_grid_thw: torch.Tensor, merge: int, prob: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per image, a bool ``[t, h//merge, w//merge]`` array: True = blacken that merge window."""
    masks = []
    for t, h, w in image_grid_thw.tolist():
        if h % merge or w % merge:
            raise ValueError(f"image_grid_thw ({t},{h},{w}) is not divisible by merge size {merge}")
        masks.append(rng.random((t, h // merge, w // merge)) < prob)
    return masks


def apply_window_mask(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, masks: list[np.ndarray],
                      merge: int, black_row: torch.Tensor) -> torch.Tensor:
    """Copy of ``pixel_values`` with the rows of masked merge windows set to ``black_row``."""
    out = pixel_values.clone()
    start = 0
    m2 = merge * merge
    for (t, h, w), mask in zip(image_grid_thw.tolist(), masks):
        n_rows = t * h * w
        rows = torch.from_numpy(np.repeat(mask.reshape(-1), m2))
        view = out[start:start + n_rows]
        view[rows] = black_row.to(out.dtype)
        start += n_rows
    if start != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw accounts for {start}")
    return out


def patches(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, image_processor: Any, prob: float,
            rng: np.random.Generator) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Blacken whole merge windows of ``pixel_values`` with probability ``prob``; returns (masked, per-image masks)."""
    merge = image_processor.merge_size
    masks = window_mask(image_grid_thw, merge, prob, rng)
    return apply_window_mask(pixel_values, image_grid_thw, masks, merge, normalized_black_row(image_processor)), masks
