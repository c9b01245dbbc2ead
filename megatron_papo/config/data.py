"""Config section ``data``: dataset, prompt formatting, image sizing and the PAPO masked view.

Pixel range: ``min_pixels``/``max_pixels`` left at ``None`` mean "auto": PAPO's published range
(256*28*28 .. 1280*28*28) for real datasets, and ``SYNTHETIC_MIN_PIXELS``..``SYNTHETIC_MAX_PIXELS``
(56*56 .. 112*112) for ``synthetic``, so a 56-px synthetic image is left untouched and becomes
4x4 ViT patches = 4 image tokens. Use :func:`pixel_range` to resolve them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron_papo.config.base import ConfigError, field

PAPO_MIN_PIXELS = 256 * 28 * 28  # 200,704 (PAPO YAML)
PAPO_MAX_PIXELS = 1280 * 28 * 28  # 1,003,520 (PAPO YAML)
SYNTHETIC_MIN_PIXELS = 56 * 56  # = 28*28*4: one 2x2 merge grid; the tiny processor's own minimum
SYNTHETIC_MAX_PIXELS = 112 * 112  # images up to 112 px stay unresized (16 image tokens)


@dataclass
class DataConfig:
    """Training/eval data. ``train: synthetic`` uses the embedded vision-dependent task."""

    train: str = field("synthetic", help="'synthetic', an HF dataset dir (save_to_disk), or a .parquet/.jsonl file")
    test: str = field("synthetic", help="eval split source (same forms as train)")
    train_split: str = field("train", help="split of a DatasetDict dir (save_to_disk) used for training")
    test_split: str = field("test", help="split of a DatasetDict dir (save_to_disk) used for evaluation")
    synthetic_train_size: int = field(2048, help="rows in the synthetic train split")
    synthetic_test_size: int = field(256, help="rows in the synthetic test split")
    synthetic_image_size: int = field(56, help="side of the synthetic task's square images (px); 56 -> 4 image tokens")
    synthetic_task: Literal["colour", "shortcut"] = field(
        "colour", help="colour: 'What colour is the shape?'; shortcut: the question also carries a colour hint (right "
        "with probability synthetic_hint_p on train; test = agree + conflict parts), see data/synthetic.py")
    synthetic_hint_p: float = field(0.75, help="shortcut task: fraction of train rows whose hint is the right colour")
    synthetic_test_conflict: float = field(0.5, help="shortcut task: fraction of test rows whose hint is a wrong colour")
    synthetic_hint_repeat: int = field(1, help="shortcut task: times the hint word is written ('Hint: red red.'); louder shortcut")
    prompt_key: str = field("problem", help="column with the question; '<image>' marks image positions")
    answer_key: str = field("answer", help="column with the ground-truth answer")
    image_key: str = field("images", help="column with the list of images (PIL, {bytes,path} dicts, paths or bytes)")
    format_prompt: Literal["math_perception", "math", "short_answer", "none"] = field(
        "math_perception", help="instruction appended to the question (see megatron_papo/data/prompt.py)")
    reward: str = field("math", help="reward function: a registered name (math | synthetic) or a plugin "
                        "path/to/file.py:fn (see megatron_papo/rewards/plugin.py for the signature)")
    reward_workers: int = field(2, help="worker processes that compute rewards (each call under reward_timeout_s); "
                                "0 = in the calling process, without a timeout")
    reward_timeout_s: float = field(30.0, help="time limit of one reward call; a reward that hangs past it or raises "
                                    "scores 0, is counted (reward/failed) and logged with the sample id")
    format_weight: float = field(0.1, help="reward = (1 - w) * accuracy + w * format (PAPO: 0.1; 0 = accuracy only)")
    max_prompt_length: int = field(4096, help="prompts longer than this (incl. image tokens) are filtered and counted")
    min_pixels: Optional[int] = field(None, help="images below this area are upscaled; None = auto (PAPO 256*28*28, synthetic 56*56)")
    max_pixels: Optional[int] = field(None, help="images above this area are downscaled; None = auto (PAPO 1280*28*28, synthetic 112*112)")
    on_bad_row: Literal["error", "skip"] = field("error", help="bad rows (missing answer, <image> count) raise or are skipped and counted")
    shuffle: bool = field(True, help="shuffle the train order every epoch (seeded by seed and epoch)")
    mask_type: Literal["pixel_squares", "patches"] = field(
        "pixel_squares", help="pixel_squares: mask_size-px squares on the raw image (published); patches: whole 2x2 ViT merge windows")
    mask_prob: float = field(0.6, help="probability that a square/merge window is blackened")
    mask_size: int = field(14, help="square side in raw-image pixels (pixel_squares only; patches always use merge windows)")
    seed: int = field(1, help="data order, synthetic generation and masking seed")

    def __post_init__(self) -> None:
        for name in ("synthetic_hint_p", "synthetic_test_conflict"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name}: got {getattr(self, name)}, expected a fraction in [0, 1]")
        if self.synthetic_hint_repeat < 1:
            raise ConfigError(f"data.synthetic_hint_repeat: got {self.synthetic_hint_repeat}, expected >= 1")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ConfigError(f"data.mask_prob: got {self.mask_prob}, expected a probability in [0, 1]")
        if self.mask_size < 1:
            raise ConfigError(f"data.mask_size: got {self.mask_size}, expected a positive pixel count")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"data.{name}: got {v}, expected a positive pixel count or null (auto)")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"data.min_pixels ({self.min_pixels}) > data.max_pixels ({self.max_pixels}); swap or lower min_pixels")
        if self.reward_workers < 0:
            raise ConfigError(f"data.reward_workers: got {self.reward_workers}, expected >= 0 (0 = in process)")
        if not self.reward_timeout_s > 0:
            raise ConfigError(f"data.reward_timeout_s: got {self.reward_timeout_s}, expected a positive number of seconds")
        if ".py:" in self.reward and not self.reward.rsplit(":", 1)[1].isidentifier():
            raise ConfigError(f"data.reward={self.reward}: expected path/to/file.py:function_name")
        if self.max_prompt_length < 1:
            raise ConfigError(f"data.max_prompt_length: got {self.max_prompt_length}, expected >= 1")


def pixel_range(cfg: DataConfig, source: str) -> tuple[int, int]:
    """Resolved ``(min_pixels, max_pixels)`` for a data ``source`` (explicit values win over auto)."""
    synthetic = source == "synthetic"
    lo = cfg.min_pixels if cfg.min_pixels is not None else (SYNTHETIC_MIN_PIXELS if synthetic else PAPO_MIN_PIXELS)
    hi = cfg.max_pixels if cfg.max_pixels is not None else (SYNTHETIC_MAX_PIXELS if synthetic else PAPO_MAX_PIXELS)
    if lo > hi:
        raise ConfigError(f"data: resolved min_pixels {lo} > max_pixels {hi} for source '{source}'; set both explicitly")
    return lo, hi
