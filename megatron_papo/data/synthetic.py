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

The ``shortcut`` variant (``data.synthetic_task=shortcut``, :func:`shortcut_rows`) tests PAPO's claim that it
makes the policy rely on the image when the text offers a shortcut: the same images, but the question
carries a textual hint, ``"<image>Hint: red. What colour is the shape?"``. On the train split the hint is
the right colour on exactly ``round(hint_p * n)`` rows (spread evenly over the classes); on the test split
on exactly ``n - round(conflict * n)`` rows (the *agree* part) and a wrong colour on the rest (the
*conflict* part; wrong hints cycle over the three other colours). A policy that copies the hint scores
``hint_p`` on train, 1 on agree and 0 on conflict; only the image answers the conflict part. The hint
word is the same token as the answer (``" red"`` tokenises as ``" "`` + ``"red"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional

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
HINT_QUESTION = "<image>Hint: {hint}. What colour is the shape?"
_HINT_RE = re.compile(r"Hint: ([a-z]+)(?: \1)*\. ")
_SPLIT_ID = {"train": 0, "test": 1}
TASKS = ("colour", "shortcut")


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


def _draw_rows(labels: np.ndarray, rng: np.random.Generator, image_size: int, split: str) -> list[dict]:
    """One image row per label (colour index), drawn from ``rng``, kept only if its parameters hash to ``split``."""
    names = list(COLOURS)
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


def _check_args(n: int, image_size: int, split: str) -> None:
    if split not in _SPLIT_ID:
        raise ValueError(f"synthetic split '{split}' unknown; known: {', '.join(_SPLIT_ID)}")
    if n < 1 or image_size < 16:
        raise ValueError(f"synthetic task: need n >= 1 and image_size >= 16, got n={n} image_size={image_size}")


def synthetic_rows(n: int, seed: int, image_size: int = 56, split: str = "train") -> list[dict]:
    """The ``n`` rows of a split as dicts ``{problem, images: [PIL], answer, shape}`` (deterministic)."""
    _check_args(n, image_size, split)
    rng = np.random.default_rng([int(seed), _SPLIT_ID[split]])
    labels = np.tile(np.arange(len(COLOURS)), -(-n // len(COLOURS)))[:n]
    rng.shuffle(labels)
    return _draw_rows(labels, rng, image_size, split)


def shortcut_rows(n: int, seed: int, image_size: int = 56, split: str = "train", hint_p: float = 0.75,
                  conflict: float = 0.5, hint_repeat: int = 1) -> list[dict]:
    """Rows of the hinted task: ``{problem, images, answer, shape, hint, agrees}`` (see module docstring).

    Train: the hint is right on exactly ``round(hint_p * n)`` rows; test: wrong on exactly ``round(conflict * n)``.
    Classes are balanced (counts differ by at most one) and agreement is spread evenly over them.
    ``hint_repeat`` writes the hint word that many times (``"Hint: red red red."``): a louder shortcut.
    """
    if hint_repeat < 1:
        raise ValueError(f"shortcut task: hint_repeat must be >= 1, got {hint_repeat}")
    _check_args(n, image_size, split)
    p_agree = hint_p if split == "train" else 1.0 - conflict
    if not 0.0 <= p_agree <= 1.0:
        raise ValueError(f"shortcut task: hint agreement rate must be in [0, 1], got {p_agree} (hint_p={hint_p}, conflict={conflict})")
    k = len(COLOURS)
    n_agree = round(p_agree * n)
    # row i has class i % k and agrees iff i < n_agree: every class gets floor/ceil(n_agree / k) agreeing rows;
    # conflicting rows cycle their wrong hint over the k-1 other colours in order
    labels = np.arange(n) % k
    offsets = np.zeros(n, dtype=np.int64)
    offsets[n_agree:] = 1 + (np.arange(n - n_agree) // k) % (k - 1)
    rng = np.random.default_rng([int(seed), _SPLIT_ID[split], 7])  # 7: not the colour task's stream
    order = rng.permutation(n)
    labels, offsets = labels[order], offsets[order]
    rows = _draw_rows(labels, rng, image_size, split)
    names = list(COLOURS)
    for row, label, off in zip(rows, labels, offsets):
        hint = names[(int(label) + int(off)) % k]
        row.update(problem=HINT_QUESTION.format(hint=" ".join([hint] * hint_repeat)), hint=hint, agrees=bool(off == 0))
    return rows


def parse_hint(problem: str) -> Optional[str]:
    """The hint colour written in a shortcut-task question, or None for a question without one."""
    m = _HINT_RE.search(problem)
    return m.group(1) if m else None


def blank_image(image: Image.Image) -> Image.Image:
    """An all-black RGB image of ``image``'s size: the masked view used by the image-reliance metric."""
    return Image.new("RGB", image.size)


def shortcut_parts(dataset: Any) -> tuple[list[int], list[int]]:
    """Indices of a PromptDataset's rows whose hint agrees with / conflicts with the answer (hintless rows: neither)."""
    agree, conflict = [], []
    for i, answer in enumerate(dataset.answers()):
        hint = parse_hint(dataset.row(i)["problem"])
        if hint is not None:
            (agree if hint == answer.strip().lower() else conflict).append(i)
    return agree, conflict


class PromptView:
    """Rows ``indices`` of a PromptDataset (``len``/``encode`` like one), for evaluation: ``blank`` makes every
    image black (same size, so the same prompt tokens); ``answer_hint`` makes the question's hint the answer."""

    def __init__(self, dataset: Any, indices: Sequence[int], blank: bool = False, answer_hint: bool = False) -> None:
        self.dataset, self.indices, self.blank, self.answer_hint = dataset, list(indices), blank, answer_hint

    def __len__(self) -> int:
        return len(self.indices)

    def encode(self, i: int) -> Any:
        """The encoded sample of row ``indices[i]`` with the view's changes."""
        s = self.dataset.encode(self.indices[i])
        if self.blank:
            s = dataclasses.replace(s, images=[blank_image(im) for im in s.images])
        if self.answer_hint:
            hint = parse_hint(self.dataset.row(self.indices[i])["problem"])
            if hint is None:
                raise ValueError(f"row {s.uid}: answer_hint view of a question without a hint")
            s = dataclasses.replace(s, answer=hint)
        return s


def shortcut_summary(parts: dict[str, tuple[float, int]], answers: Sequence[str]) -> dict[str, float]:
    """Shortcut-task metrics from per-part ``(accuracy, questions)``: parts ``agree``, ``conflict``,
    ``conflict_hint`` (accuracy against the hint on the conflict part = how often it is copied) and ``blank``
    (every image black, all questions). Adds ``image_reliance`` = accuracy - blank accuracy and the baselines:
    ``majority_baseline`` and ``hint_baseline`` (always answer the hint: the agree fraction)."""
    (acc_a, n_a), (acc_c, n_c) = parts["agree"], parts["conflict"]
    n = n_a + n_c
    if n == 0:
        raise ValueError("shortcut_summary: no questions")
    acc = (acc_a * n_a + acc_c * n_c) / n
    nan = float("nan")
    return {"accuracy": acc, "accuracy_agree": acc_a if n_a else nan, "accuracy_conflict": acc_c if n_c else nan,
            "hint_follow_conflict": parts["conflict_hint"][0] if n_c else nan, "accuracy_masked": parts["blank"][0],
            "image_reliance": acc - parts["blank"][0], "majority_baseline": majority_baseline(answers),
            "hint_baseline": n_a / n, "questions": float(n), "questions_conflict": float(n_c)}


def task_rows(n: int, seed: int, image_size: int = 56, split: str = "train", task: str = "colour",
              hint_p: float = 0.75, conflict: float = 0.5, hint_repeat: int = 1) -> list[dict]:
    """Rows of the named synthetic ``task`` (``colour`` or ``shortcut``)."""
    if task == "colour":
        return synthetic_rows(n, seed, image_size, split)
    if task == "shortcut":
        return shortcut_rows(n, seed, image_size, split, hint_p=hint_p, conflict=conflict, hint_repeat=hint_repeat)
    raise ValueError(f"unknown synthetic task '{task}'; known: {', '.join(TASKS)}")


def build_synthetic_dataset(n: int, seed: int, image_size: int = 56, split: str = "train", task: str = "colour",
                            hint_p: float = 0.75, conflict: float = 0.5, hint_repeat: int = 1):
    """A ``datasets.Dataset`` with columns ``problem``, ``images`` (list of Image), ``answer``, ``shape``
    (the shortcut task adds ``hint`` and ``agrees``)."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as HFImage

    rows = task_rows(n, seed, image_size, split, task, hint_p, conflict, hint_repeat)
    cols = {"problem": Value("string"), "images": List(HFImage()), "answer": Value("string"), "shape": Value("string")}
    if task == "shortcut":
        cols |= {"hint": Value("string"), "agrees": Value("bool")}
    features = Features(cols)
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
