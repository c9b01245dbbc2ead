"""The shortcut variant of the synthetic task and its held-out metrics.

Evidence: counts recomputed from the rows, the image's own pixels (which colour is drawn), the real reward
function scoring a hint-copying oracle, and :func:`evaluate_shortcut` driven by two scripted engines whose
answers are known in advance (one copies the hint, one reads the colour off the pixels it is given).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_papo.config.base import ConfigError
from megatron_papo.config.data import DataConfig
from megatron_papo.data.synthetic import (
    COLOURS,
    HINT_QUESTION,
    build_synthetic_dataset,
    parse_hint,
    shortcut_rows,
    synthetic_rows,
)
from megatron_papo.rewards import get_reward_fn


def _digest(img) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def _drawn_colour(img) -> str:
    arr = np.array(img).reshape(-1, 3)
    present = [name for name, rgb in COLOURS.items() if (arr == np.array(rgb)).all(axis=1).any()]
    assert len(present) == 1, present
    return present[0]


@pytest.mark.parametrize("split,n,hint_p,conflict,repeat", [("train", 2048, 0.75, 0.5, 1), ("train", 402, 0.6, 0.5, 4),
                                                            ("test", 256, 0.75, 0.5, 4), ("test", 301, 0.75, 0.3, 1)])
def test_balanced_and_agreement_at_stated_rate(split, n, hint_p, conflict, repeat):
    rows = shortcut_rows(n, 3, split=split, hint_p=hint_p, conflict=conflict, hint_repeat=repeat)
    agree_rate = hint_p if split == "train" else 1 - conflict
    n_agree = sum(r["hint"] == r["answer"] for r in rows)
    assert n_agree == round(agree_rate * n)
    assert [r["agrees"] for r in rows] == [r["hint"] == r["answer"] for r in rows]
    classes = Counter(r["answer"] for r in rows)
    assert set(classes) == set(COLOURS) and max(classes.values()) - min(classes.values()) <= 1
    per_class_agree = Counter(r["answer"] for r in rows if r["agrees"])
    assert max(per_class_agree.values()) - min(per_class_agree.values()) <= 1  # agreement independent of the class
    wrong = Counter((r["answer"], r["hint"]) for r in rows if not r["agrees"])
    assert all(a != h for a, h in wrong) and len(wrong) == 12  # every wrong hint of every class occurs...
    assert max(wrong.values()) - min(wrong.values()) <= 1  # ...equally often: a wrong hint says nothing about the answer
    hints = Counter(r["hint"] for r in rows)  # agree and conflict parts each off by at most one per colour
    assert max(hints.values()) - min(hints.values()) <= (1 if n % 12 == 0 else 2)
    for r in rows[:40]:
        assert r["problem"] == HINT_QUESTION.format(hint=" ".join([r["hint"]] * repeat))
        assert parse_hint(r["problem"]) == r["hint"]
        assert _drawn_colour(r["images"][0]) == r["answer"]  # the image shows the answer, whatever the hint says


def test_deterministic_and_train_test_prompts_disjoint():
    a, b = shortcut_rows(64, 5), shortcut_rows(64, 5)
    assert [(_digest(r["images"][0]), r["problem"]) for r in a] == [(_digest(r["images"][0]), r["problem"]) for r in b]
    # tiny 16-px images collide often unless the splits are partitioned; a prompt = (image, question text)
    train = shortcut_rows(3000, 1, image_size=16, split="train")
    test = shortcut_rows(1000, 1, image_size=16, split="test")
    assert not {_digest(r["images"][0]) for r in train} & {_digest(r["images"][0]) for r in test}
    assert not {(_digest(r["images"][0]), r["problem"]) for r in train} & {(_digest(r["images"][0]), r["problem"]) for r in test}
    assert parse_hint(synthetic_rows(1, 1)[0]["problem"]) is None  # the colour task has no hint
    assert parse_hint("<image>Hint: red blue. What colour is the shape?") is None  # repeats must agree


def test_hint_following_oracle_scores_p_train_and_zero_on_conflict():
    """The real reward on a policy that answers the hint: p_train on train, 1 on agree, 0 on conflict."""
    reward = get_reward_fn("synthetic")
    for p in (0.75, 0.9):
        train = shortcut_rows(800, 2, split="train", hint_p=p)
        acc = [r["accuracy"] for r in reward([parse_hint(x["problem"]) for x in train], [x["answer"] for x in train])]
        assert np.mean(acc) == pytest.approx(p, abs=1 / 800)
    test = shortcut_rows(256, 2, split="test")
    for part, want in ((True, 1.0), (False, 0.0)):
        rows = [x for x in test if x["agrees"] is part]
        acc = [r["accuracy"] for r in reward([parse_hint(x["problem"]) for x in rows], [x["answer"] for x in rows])]
        assert len(rows) == 128 and np.mean(acc) == want


def test_config_and_dataset_columns():
    ds = build_synthetic_dataset(8, 0, split="test", task="shortcut")
    assert ds.column_names == ["problem", "images", "answer", "shape", "hint", "agrees"]
    assert sum(ds["agrees"]) == 4
    with pytest.raises(ValueError, match="unknown synthetic task 'hints'"):
        build_synthetic_dataset(8, 0, task="hints")
    with pytest.raises(ConfigError, match=r"data.synthetic_hint_p: got 1.5"):
        DataConfig(synthetic_hint_p=1.5)


class _ScriptedEngine:
    """Greedy single-token 'policy': ``mode='hint'`` answers the hint, ``mode='image'`` the colour drawn in the
    image it receives (an all-black image has none: it answers 'red')."""

    def __init__(self, mode: str):
        self.mode = mode

    def generate(self, prompts, n, sampling, seeds):
        outs = []
        for prompt, images in prompts:
            if self.mode == "hint":
                word = parse_hint(prompt)
            else:
                arr = np.array(images[0]).reshape(-1, 3)
                seen = [c for c, rgb in COLOURS.items() if (arr == np.array(rgb)).all(axis=1).any()]
                word = seen[0] if seen else "red"
            outs.append([SimpleNamespace(text=word, token_ids=[])] * n)
        return outs


@pytest.fixture(scope="module")
def shortcut_test_ds(tiny_model_dir):
    from transformers import AutoProcessor

    from megatron_papo.data.dataset import load_prompt_dataset

    cfg = DataConfig(synthetic_task="shortcut", synthetic_test_size=48, format_prompt="short_answer", seed=4)
    return load_prompt_dataset("synthetic", cfg, AutoProcessor.from_pretrained(tiny_model_dir), "test")


@pytest.mark.parametrize("mode", ["hint", "image"])
def test_evaluate_shortcut_with_scripted_policies(shortcut_test_ds, mode):
    from megatron_papo.data.synthetic import shortcut_parts
    from megatron_papo.evaluate import evaluate_shortcut

    ds = shortcut_test_ds
    rows = shortcut_rows(48, 4, split="test")
    agree, conflict = shortcut_parts(ds)
    assert agree == [i for i, r in enumerate(rows) if r["agrees"]] and len(conflict) == 24
    res = evaluate_shortcut(_ScriptedEngine(mode), ds, get_reward_fn("synthetic"), n=1,
                            sampling={"temperature": 0.0}, seed=0)
    blank_red = sum(r["answer"] == "red" for r in rows) / 48  # the image reader on black images says 'red'
    want = ({"accuracy": 0.5, "accuracy_agree": 1.0, "accuracy_conflict": 0.0, "hint_follow_conflict": 1.0,
             "accuracy_masked": 0.5, "image_reliance": 0.0} if mode == "hint" else
            {"accuracy": 1.0, "accuracy_agree": 1.0, "accuracy_conflict": 1.0, "hint_follow_conflict": 0.0,
             "accuracy_masked": blank_red, "image_reliance": 1.0 - blank_red})
    for k, v in want.items():
        assert res[k] == pytest.approx(v), k
    assert res["majority_baseline"] == pytest.approx(12 / 48) and res["hint_baseline"] == 0.5 and res["questions"] == 48


def test_validator_routes_the_shortcut_task(tiny_model_dir):
    """The trainer's validation path: ``data.synthetic_task=shortcut`` gives the shortcut metrics (per benchmark and,
    with one benchmark, at the top level), colour does not."""
    from transformers import AutoProcessor

    from megatron_papo.config import load_config
    from megatron_papo.evaluate import Validator

    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    reward = get_reward_fn("synthetic")
    cfg = load_config("tiny_cpu", ["data.synthetic_task=shortcut", "data.synthetic_test_size=16"])
    res = Validator(cfg, proc, reward)(_ScriptedEngine("image"), step=1)
    assert res["eval/accuracy_conflict"] == 1.0 and res["eval/test/accuracy_conflict"] == 1.0
    assert res["eval/test/questions"] == 16 and res["eval/hint_baseline"] == 0.5
    res = Validator(load_config("tiny_cpu", ["data.synthetic_test_size=16"]), proc, reward)(_ScriptedEngine("image"), 1)
    assert res["eval/accuracy"] == 1.0 and not any("conflict" in k for k in res)
