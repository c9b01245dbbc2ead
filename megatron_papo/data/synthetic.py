"""A synthetic vision-dependent task in the ViRL39K schema: "What colour is the shape?".

Each row is one ``image_size`` x ``image_size`` image with a single filled shape (square, circle or
triangle; random size 35-70 % of the side, random position) in one of four colours on a plain grey
background of random brightness. The question text is identical for every row and the classes are
exactly balanced (counts differ by at most one), so without the image no policy beats the majority
baseline of ~0.25. The answers ``red``/``green``/``blue``/``yellow`` are single tokens of the tiny
tokenizer right after ``assistant\\n`` (see ``fixtures/tiny.py``), so 2 new tokens suffice.

Determinism and splits: everything comes from ``np.random.default_rng([seed, split_id])``. Train and
test are disjoint by construction: a row's parameter tuple is hashed and train keeps only even
hashes, test only odd ones (rejection sampling), so no image can appear in both splits.

Data-config defaults for it (``config/data.py``): the auto pixel range for ``synthetic`` is
56*56..112*112, so images up to 112 px are not resized; with the tiny processor a 56-px image is 4x4
ViT patches = 4 image tokens. Use ``format_prompt=short_answer`` and ``reward=synthetic``.

Measured (2026-11, plain-PyTorch GRPO through this data pipeline; tiny model, 512-token vocab, 16 prompts
x 8 samples, Adam, 1 new token, greedy held-out accuracy on 256 test rows, majority 0.25): lr 3e-4 ->
0.50 at step 300 (seed 0), 0.46 at step 200 and 0.50 at step 400 (seed 1); lr 1e-3 collapsed to one colour (0.25) with
1 or 2 new tokens. A linear probe on the random-init model's last hidden state reads the colour at 0.99,
so the image carries the signal; the failure mode is entropy collapse, not the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("square", "circle", "triangle")
QUESTION = "<image>What colour is the shape?"
_SPLIT_ID = {"train": 0, "test": 1}


def _params_parity(params: tuple) -> int:
    return hashlib.sha256(repr(params).encode()).digest()[0] & 1


def draw_shape(image_size: int, colour: str, shape: str, x: int, y: int, side: int, bg: int) -> Image.Image:
    """Render one row's image: a filled ``shape`` with bounding box (x, y, side) on grey level ``bg``."""
    img = Image.new("RGB", (image_size, image_size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    box = (x, y, x + side - 1, y + side - 1)
    rgb = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x + (side - 1) / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}")
    return img


def synthetic_rows(n: int, seed: int, image_size: int = 56, split: str = "train") -> list[dict]:
    """The ``n`` rows of a split as dicts ``{problem, images: [PIL], answer, shape}`` (deterministic)."""
    if split not in _SPLIT_ID:
        raise ValueError(f"synthetic split '{split}' unknown; known: {', '.join(_SPLIT_ID)}")
    if n < 1 or image_size < 16:
        raise ValueError(f"synthetic task: need n >= 1 and image_size >= 16, got n={n} image_size={image_size}")
    rng = np.random.default_rng([int(seed), _SPLIT_ID[split]])
    names = list(COLOURS)
    labels = np.tile(np.arange(len(names)), -(-n // len(names)))[:n]
    rng.shuffle(labels)
    lo_side, hi_side = max(4, round(0.35 * image_size)), max(5, round(0.70 * image_size))
    rows = []
    for label in labels:
        colour = names[int(label)]
        while True:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            side = int(rng.integers(lo_side, hi_side + 1))
            x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            bg = int(rng.integers(120, 256))
            params = (image_size, colour, shape, x, y, side, bg)
            if _params_parity(params) == _SPLIT_ID[split]:
                break
        rows.append({"problem": QUESTION, "images": [draw_shape(image_size, colour, shape, x, y, side, bg)],
                     "answer": colour, "shape": shape})
    return rows


def build_synthetic_dataset(n: int, seed: int, image_size: int = 56, split: str = "train"):
    """A ``datasets.Dataset`` with columns ``problem``, ``images`` (list of Image), ``answer``, ``shape``."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as HFImage

    rows = synthetic_rows(n, seed, image_size, split)
    features = Features({"problem": Value("string"), "images": List(HFImage()), "answer": Value("string"),
                         "shape": Value("string")})
    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def write_synthetic(out_dir: str | os.PathLike, n_train: int = 2048, n_test: int = 256, seed: int = 1,
                    image_size: int = 56, fmt: Literal["parquet", "disk", "jsonl"] = "parquet") -> dict[str, Path]:
    """Write both splits under ``out_dir``; returns ``{"train": path, "test": path}``.

    ``parquet``: ``{split}.parquet`` (images embedded as bytes); ``disk``: ``save_to_disk`` directories;
    ``jsonl``: ``{split}.jsonl`` with PNGs under ``images/{split}/`` referenced by relative paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        if fmt == "parquet":
            paths[split] = out / f"{split}.parquet"
            build_synthetic_dataset(n, seed, image_size, split).to_parquet(str(paths[split]))
        elif fmt == "disk":
            paths[split] = out / split
            build_synthetic_dataset(n, seed, image_size, split).save_to_disk(str(paths[split]))
        elif fmt == "jsonl":
            img_dir = out / "images" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            paths[split] = out / f"{split}.jsonl"
            with open(paths[split], "w") as f:
                for i, row in enumerate(synthetic_rows(n, seed, image_size, split)):
                    rel = Path("images") / split / f"{i:06d}.png"
                    row["images"][0].save(out / rel)
                    f.write(json.dumps({"problem": row["problem"], "images": [str(rel)], "answer": row["answer"],
                                        "shape": row["shape"]}) + "\n")
        else:
            raise ValueError(f"write_synthetic: unknown fmt '{fmt}'; known: parquet, disk, jsonl")
    return paths


def majority_baseline(answers: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent answer (case-insensitive, stripped)."""
    if not answers:
        raise ValueError("majority_baseline: no answers")
    counts = Counter(str(a).strip().lower() for a in answers)
    return max(counts.values()) / len(answers)
