"""Encode one prompt row with the HF processor (:func:`encode_prompt`) and build its masked view.

A row is a mapping with the canonical keys ``uid``, ``problem``, ``images``, ``answer`` (the dataset
layer renames configured columns to these). Images go: decode to RGB -> PAPO resize by the data
pixel range -> processor (smart-resize to multiples of 28, normalise, patchify). The resized PIL
images are what the rollout engine receives; the engine's processor must be the same one.
Deliberate deviation: we convert to RGB *before* PAPO's resize (EasyR1 resizes, then converts), so
palette/greyscale images are resized in RGB; identical for RGB inputs.

Both views of a prompt share ``prompt_ids``, ``image_grid_thw`` and hence M-RoPE positions; only
``pixel_values`` differ (:func:`make_masked_view` checks this).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from PIL import Image

from megatron_papo.config.data import DataConfig, pixel_range
from megatron_papo.data import masking
from megatron_papo.data.images import decode_image, resize_by_pixels
from megatron_papo.data.prompt import build_messages, render_prompt


@dataclass
class PromptSample:
    """One encoded prompt (shared by all ``n`` rollouts of its group)."""

    uid: int  #: stable prompt id (row index in the source dataset); groups advantages, seeds masks
    prompt: str  #: chat-templated text with one ``<|image_pad|>`` per image (what engines take with ``images``)
    prompt_ids: torch.Tensor  #: LongTensor [P], image pads expanded exactly as the processor does
    pixel_values: torch.Tensor  #: FloatTensor [N_patches, C*T*P*P] (processor layout, all images concatenated)
    image_grid_thw: torch.Tensor  #: LongTensor [n_images, 3]
    images: list[Image.Image]  #: RGB images after PAPO's resize (processor/engine input)
    answer: str  #: ground truth
    raw_images: list[Image.Image] = field(default_factory=list)  #: decoded RGB before resize (pixel_squares masking)
    mm_token_type_ids: Optional[torch.Tensor] = None  #: LongTensor [P] (1 on image tokens) if the processor returns it
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  #: other per-prompt processor outputs
    pixel_range: tuple[int, int] = (0, 0)  #: (min_pixels, max_pixels) used to resize ``raw_images`` into ``images``


_PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def process_images(processor: Any, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, image_grid_thw)`` for already-resized RGB images via the processor's image processor."""
    out = processor.image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def encode_prompt(processor: Any, row: Mapping[str, Any], cfg: DataConfig, source: Optional[str] = None,
                  base_dir: Optional[str] = None) -> PromptSample:
    """Encode a canonical row into a :class:`PromptSample`.

    ``source`` picks the auto pixel range (default ``cfg.train``); ``base_dir`` resolves relative image paths.
    """
    uid = int(row["uid"])
    where = f"row {uid}"
    raw = [decode_image(im, where=f"{where} image {i}", base_dir=base_dir) for i, im in enumerate(row.get("images") or [])]
    lo, hi = pixel_range(cfg, source if source is not None else cfg.train)
    images = [resize_by_pixels(im, lo, hi) for im in raw]
    try:
        messages = build_messages(str(row["problem"]), len(images), cfg.format_prompt)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    text = render_prompt(processor, messages)
    out = processor(text=[text], images=images or None, return_tensors="pt")
    if images:
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
    else:
        pixel_values = torch.zeros(0, 0)
        grid = torch.zeros(0, 3, dtype=torch.long)
    mm = out.get("mm_token_type_ids")
    extra = {k: v for k, v in out.items() if k not in (*_PER_TOKEN_KEYS, "pixel_values", "image_grid_thw")}
    return PromptSample(
        uid=uid, prompt=text, prompt_ids=out["input_ids"][0].long(), pixel_values=pixel_values,
        image_grid_thw=grid, images=images, answer=str(row["answer"]), raw_images=raw,
        mm_token_type_ids=mm[0].long() if mm is not None else None, extra=extra, pixel_range=(lo, hi),
    )


def make_masked_view(sample: PromptSample, cfg: DataConfig, seed: int, step: int, processor: Any) -> torch.Tensor:
    """``pixel_values`` of the masked view of ``sample`` at training ``step`` (seeded by seed, step, uid).

    ``pixel_squares`` masks the raw images (``cfg.mask_size`` px squares), re-runs PAPO's resize (with the
    sample's own ``pixel_range``) and the processor; ``patches`` blackens merge windows in ``sample.pixel_values``. Both keep the grid.
    """
    if not sample.images:
        return sample.pixel_values.clone()
    rng = masking.mask_rng(seed, step, sample.uid)
    if cfg.mask_type == "patches":
        aug, _ = masking.patches(sample.pixel_values, sample.image_grid_thw, processor.image_processor, cfg.mask_prob, rng)
        return aug
    if cfg.mask_type != "pixel_squares":
        raise ValueError(f"unknown data.mask_type '{cfg.mask_type}'; known: pixel_squares, patches")
    if len(sample.raw_images) != len(sample.images):
        raise ValueError(f"row {sample.uid}: pixel_squares masking needs the raw images; PromptSample.raw_images is empty")
    lo, hi = sample.pixel_range
    masked = [resize_by_pixels(masking.pixel_squares(im, cfg.mask_prob, cfg.mask_size, rng)[0], lo, hi)
              for im in sample.raw_images]
    pixel_values, grid = process_images(processor, masked)
    if not torch.equal(grid, sample.image_grid_thw) or pixel_values.shape != sample.pixel_values.shape:
        raise RuntimeError(f"row {sample.uid}: masked view changed the image grid {sample.image_grid_thw.tolist()} -> {grid.tolist()}")
    return pixel_values
