"""Config section ``data``: dataset, prompt formatting, image sizing and the PAPO masked view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_papo.config.base import field


@dataclass
class DataConfig:
    """Training/eval data. ``train: synthetic`` uses the embedded vision-dependent task."""

    train: str = field("synthetic", help="'synthetic', an HF dataset dir, or a .parquet/.jsonl file")
    test: str = field("synthetic", help="eval split source (same forms as train)")
    synthetic_train_size: int = field(2048, help="rows in the synthetic train split")
    synthetic_test_size: int = field(256, help="rows in the synthetic test split")
    synthetic_image_size: int = field(56, help="side of the synthetic task's square images (px)")
    prompt_key: str = field("problem", help="column with the question; '<image>' marks image positions")
    answer_key: str = field("answer", help="column with the ground-truth answer")
    image_key: str = field("images", help="column with the list of images")
    format_prompt: Literal["math_perception", "none", "short_answer"] = field(
        "math_perception", help="instruction appended to the question")
    reward: str = field("math", help="reward function name (math | synthetic)")
    max_prompt_length: int = field(4096, help="prompts longer than this (incl. image tokens) are filtered and counted")
    min_pixels: int = field(200704, help="images below this area are upscaled (PAPO: 256*28*28)")
    max_pixels: int = field(1003520, help="images above this area are downscaled (PAPO: 1280*28*28)")
    on_bad_row: Literal["error", "skip"] = field("error", help="bad rows (missing answer, <image> count) raise or are skipped and counted")
    mask_type: Literal["pixel_squares", "patches"] = field(
        "pixel_squares", help="pixel_squares: 14-px squares on the raw image (published); patches: whole ViT merge windows")
    mask_prob: float = field(0.6, help="probability that a square/patch is blackened")
    mask_size: int = field(14, help="square side in pixels (pixel_squares)")
    seed: int = field(1, help="data order and masking seed")
