"""The synthetic colour task: deterministic, balanced, vision-dependent, train/test disjoint, labels right."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from megatron_papo.data.synthetic import COLOURS, QUESTION, build_synthetic_dataset, majority_baseline, synthetic_rows


def _digest(img) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_deterministic_by_seed():
    a, b, c = synthetic_rows(40, 3), synthetic_rows(40, 3), synthetic_rows(40, 4)
    assert [(_digest(r["images"][0]), r["answer"]) for r in a] == [(_digest(r["images"][0]), r["answer"]) for r in b]
    assert [_digest(r["images"][0]) for r in a] != [_digest(r["images"][0]) for r in c]


def test_balanced_and_question_constant():
    rows = synthetic_rows(402, 1)
    counts = {k: sum(r["answer"] == k for r in rows) for k in COLOURS}
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 402
    assert {r["problem"] for r in rows} == {QUESTION}
    assert majority_baseline([r["answer"] for r in rows]) == pytest.approx(101 / 402)
    assert majority_baseline(["Red", "red ", "blue", "green"]) == 0.5


def test_label_is_the_drawn_colour():
    """Independent check: the answer's RGB is present in the image and no other class colour is."""
    for r in synthetic_rows(60, 2, image_size=56):
        arr = np.array(r["images"][0]).reshape(-1, 3)
        present = {name for name, rgb in COLOURS.items() if (arr == np.array(rgb)).all(axis=1).any()}
        assert present == {r["answer"]}
        assert r["images"][0].size == (56, 56) and r["images"][0].mode == "RGB"


def test_train_test_disjoint():
    train = {_digest(r["images"][0]) for r in synthetic_rows(3000, 1, image_size=16, split="train")}
    test = {_digest(r["images"][0]) for r in synthetic_rows(1000, 1, image_size=16, split="test")}
    assert not train & test  # tiny 16-px images make collisions likely if the splits were not partitioned


def test_dataset_schema_and_image_size():
    ds = build_synthetic_dataset(8, 0, image_size=32)
    assert ds.column_names == ["problem", "images", "answer", "shape"]
    assert len(ds) == 8 and ds[0]["images"][0].size == (32, 32)
    with pytest.raises(ValueError, match="split 'val' unknown"):
        synthetic_rows(4, 0, split="val")
