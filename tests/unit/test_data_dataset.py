"""Dataset loading (parquet / jsonl / save_to_disk / synthetic), row validation, length filter, sampler."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from megatron_papo.config.base import ConfigError
from megatron_papo.config.data import DataConfig
from megatron_papo.data.dataset import EpochSampler, PromptDataset, PromptLoader, load_prompt_dataset, load_split
from megatron_papo.data.synthetic import synthetic_rows, write_synthetic
from megatron_papo.errors import DataError


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _png(rgb=(10, 20, 30), size=(56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "disk"])
def test_round_trip_formats(tmp_path, processor, fmt):
    paths = write_synthetic(tmp_path, n_train=12, n_test=4, seed=5, fmt=fmt)
    ref = synthetic_rows(12, 5)
    cfg = DataConfig(format_prompt="short_answer", min_pixels=3136, max_pixels=12544)
    ds = load_prompt_dataset(str(paths["train"]), cfg, processor)
    assert len(ds) == 12 and ds.stats["kept"] == 12
    for i in (0, 7, 11):
        s = ds.encode(i)
        assert s.uid == i and s.answer == ref[i]["answer"]
        assert np.array_equal(np.array(s.images[0]), np.array(ref[i]["images"][0]))
    assert len(load_prompt_dataset(str(paths["test"]), cfg, processor)) == 4


def test_dataset_dict_dir_and_load_split(tmp_path, processor):
    import datasets

    from megatron_papo.data.synthetic import build_synthetic_dataset

    dd = datasets.DatasetDict({"train": build_synthetic_dataset(6, 2), "validation": build_synthetic_dataset(3, 2, split="test")})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(train=str(tmp_path / "dd"), test=str(tmp_path / "dd"), test_split="validation", format_prompt="none")
    assert (len(load_split(cfg, processor, "train")), len(load_split(cfg, processor, "test"))) == (6, 3)
    cfg.test_split = "dev"
    with pytest.raises(ConfigError, match=r"has splits \['train', 'validation'\], not 'dev'"):
        load_split(cfg, processor, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a save_to_disk dataset"):
        load_prompt_dataset(str(tmp_path / "empty"), cfg, processor)


def test_synthetic_source_uses_config(processor):
    cfg = DataConfig(format_prompt="short_answer", synthetic_train_size=20, synthetic_test_size=8, seed=3)
    train = load_prompt_dataset("synthetic", cfg, processor, split="train")
    test = load_prompt_dataset("synthetic", cfg, processor, split="test")
    assert (len(train), len(test)) == (20, 8)
    s = train.encode(0)
    assert s.image_grid_thw.tolist() == [[1, 4, 4]] and s.images[0].size == (56, 56)  # 4 image tokens
    assert sorted(train.answers()) == sorted(r["answer"] for r in synthetic_rows(20, 3))


def _table(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_bad_rows_error_or_skip(processor):
    good = {"question": "<image>Q", "pics": [{"bytes": _png(), "path": None}], "gt": "a"}
    rows = [good, {**good, "gt": None}, {**good, "question": "<image><image>Q"}, {**good, "gt": "  "},
            {**good, "pics": [{"bytes": b"junk", "path": None}]}, good]
    cfg = DataConfig(prompt_key="question", image_key="pics", answer_key="gt", format_prompt="none")
    with pytest.raises(ValueError, match=r"row 1: missing answer in column 'gt'; fix the data or set data.on_bad_row=skip"):
        PromptDataset(_table(rows), cfg, processor, "t")
    with pytest.raises(ValueError, match=r"row 2: 2 '<image>' placeholders in 'question' but 1 images in 'pics'"):
        PromptDataset(_table([good, good, rows[2]]), cfg, processor, "t")
    with pytest.raises(ValueError, match=r"row 0 image 0: cannot decode image bytes"):
        PromptDataset(_table([rows[4]]), cfg, processor, "t")
    cfg.on_bad_row = "skip"
    ds = PromptDataset(_table(rows), cfg, processor, "t")
    assert ds.kept == [0, 5] and [ds.encode(i).uid for i in range(2)] == [0, 5]
    assert ds.stats == {"rows": 6, "bad_text": 0, "bad_json": 0, "missing_answer": 2, "image_count": 1, "bad_image": 1,
                        "image_rejected": 0, "overlong": 0, "kept": 2}
    assert ds.summary() == "skipped missing_answer: 2 (rows 1, 3), image_count: 1 (row 2), bad_image: 1 (row 4)"


def test_missing_column_is_a_config_error(processor):
    with pytest.raises(ConfigError, match=r"no column 'problem' \(data.prompt_key\)"):
        PromptDataset(_table([{"q": "x", "images": [], "answer": "1"}]), DataConfig(), processor, "t")


def test_overlong_prompts_filtered_and_counted(processor):
    small, big = {"bytes": _png(size=(56, 56)), "path": None}, {"bytes": _png(size=(112, 112)), "path": None}
    rows = [{"problem": "<image>Q", "images": [small], "answer": "1"}, {"problem": "<image>Q", "images": [big], "answer": "1"}]
    cfg = DataConfig(format_prompt="none", min_pixels=3136, max_pixels=12544)
    lens = [PromptDataset(_table([r]), cfg, processor, "t").encode(0).prompt_ids.numel() for r in rows]
    assert lens[1] - lens[0] == 16 - 4  # 112 px -> 16 image tokens, 56 px -> 4
    cfg.max_prompt_length = lens[0]
    ds = PromptDataset(_table(rows), cfg, processor, "t")
    assert ds.kept == [0] and ds.stats["overlong"] == 1
    cfg.max_prompt_length = lens[0] - 1
    with pytest.raises(ConfigError, match="no usable rows left"):
        PromptDataset(_table(rows), cfg, processor, "t")


def test_jsonl_relative_paths_and_missing_source(tmp_path, processor):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (56, 56), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "Q", "images": ["img/a.png"], "answer": "x"}) + "\n")
    ds = load_prompt_dataset(str(tmp_path / "d.jsonl"), DataConfig(format_prompt="none"), processor)
    assert ds.encode(0).raw_images[0].getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompt_dataset(str(tmp_path / "nope.parquet"), DataConfig(), processor)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ConfigError, match="unsupported file type '.csv'"):
        load_prompt_dataset(str(tmp_path / "x.csv"), DataConfig(), processor)


def test_sampler_deterministic_epochs_and_exact_resume():
    s = EpochSampler(10, 3, seed=7)
    batches = [s.next_indices() for _ in range(7)]  # 3 full batches per epoch, tail of 1 dropped
    assert s.batches_per_epoch == 3
    for e in range(2):
        epoch = batches[3 * e:3 * e + 3]
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 9 and flat == list(np.random.default_rng([7, e]).permutation(10)[:9])
    assert batches[:3] != batches[3:6]
    again = EpochSampler(10, 3, seed=7)
    assert [again.next_indices() for _ in range(7)] == batches
    # resume after 4 batches: the rest is identical
    part = EpochSampler(10, 3, seed=7)
    for _ in range(4):
        part.next_indices()
    state = part.state_dict()
    assert state == {"epoch": 1, "index": 3}
    resumed = EpochSampler(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(3)] == batches[4:7]
    assert EpochSampler(5, 5, 0, shuffle=False).next_indices() == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="batch of 6 prompts needs at least that many rows, dataset has 5"):
        EpochSampler(5, 6, 0)


def test_loader_batches_have_stable_uids(processor):
    cfg = DataConfig(format_prompt="short_answer", synthetic_train_size=8)
    ds = load_prompt_dataset("synthetic", cfg, processor)
    loader = PromptLoader(ds, 4, seed=1)
    first = loader.next_batch()
    state = loader.state_dict()
    second = loader.next_batch()
    assert sorted(s.uid for s in first + second) == list(range(8))
    loader2 = PromptLoader(ds, 4, seed=1)
    loader2.load_state_dict(state)
    assert [s.uid for s in loader2.next_batch()] == [s.uid for s in second]


def test_plain_parquet_with_bytes_path_structs(tmp_path, processor):
    """A parquet written without HF metadata (images as list<struct<bytes, path>>), like PAPO's fallback loader sees."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": "<image>Q1", "images": [{"bytes": _png((200, 0, 0)), "path": "a.png"}], "answer": "red"},
            {"problem": "Look: <image> and <image>", "images": [{"bytes": _png((0, 0, 200)), "path": None},
                                                               {"bytes": _png((0, 200, 0), (28, 28)), "path": None}],
             "answer": "blue"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "plain.parquet")
    ds = load_prompt_dataset(str(tmp_path / "plain.parquet"), DataConfig(format_prompt="none"), processor)
    assert len(ds) == 2
    s = ds.encode(1)
    assert [im.getpixel((0, 0)) for im in s.raw_images] == [(0, 0, 200), (0, 200, 0)]
    assert s.image_grid_thw.shape == (2, 3) and s.prompt.count("<|image_pad|>") == 2
    assert s.prompt.index("Look: ") < s.prompt.index("<|vision_start|>")


def test_every_bad_row_kind_is_named_with_file_and_row_and_skippable(tmp_path, processor):
    """Undecodable text, malformed JSON, an image the processor rejects (aspect ratio 600), a missing answer and a
    placeholder/image mismatch: each is one error naming the file and the row, and each is skipped and counted."""
    Image.new("RGB", (56, 56), (1, 2, 3)).save(tmp_path / "ok.png")
    Image.new("RGB", (3000, 5), (1, 2, 3)).save(tmp_path / "wide.png")
    good = json.dumps({"problem": "Q", "images": ["ok.png"], "answer": "x"}).encode()
    lines = [good, b'{"problem": "Q \xff\xfe", "images": ["ok.png"], "answer": "x"}', b'{"problem": "Q",', good,
             json.dumps({"problem": "Q", "images": ["wide.png"], "answer": "x"}).encode(),
             json.dumps({"problem": "Q", "images": ["ok.png"], "answer": None}).encode(),
             json.dumps({"problem": "<image><image>Q", "images": ["ok.png"], "answer": "x"}).encode(), b"", good]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = DataConfig(format_prompt="none", min_pixels=3136, max_pixels=12544)
    bad = {1: r"row 1 \(line 2\): text is not UTF-8 \(byte 0xff at column 16\)", 2: r"row 1 \(line 2\): not valid JSON",
           4: r"row 1 image 0: the image processor rejects it \(3000x5 px\): absolute aspect ratio must be smaller than 200",
           5: r"row 1: missing answer in column 'answer'", 6: r"row 1: 2 '<image>' placeholders in 'problem' but 1 images"}
    for i, msg in bad.items():  # on_bad_row=error: the first bad row stops the load, named with file and row
        one = tmp_path / f"bad_{i}.jsonl"
        one.write_bytes(b"\n".join([good, lines[i], good]) + b"\n")
        with pytest.raises(DataError, match=rf"data '{one}' {msg}.*; fix the data or set data.on_bad_row=skip"):
            load_prompt_dataset(str(one), cfg, processor)
    cfg.on_bad_row = "skip"
    ds = load_prompt_dataset(str(path), cfg, processor)
    assert ds.kept == [0, 3, 7] and [ds.encode(i).uid for i in range(3)] == [0, 3, 7]  # uids = source rows
    assert {k: v for k, v in ds.stats.items() if v} == {"rows": 8, "bad_text": 1, "bad_json": 1, "missing_answer": 1,
                                                       "image_count": 1, "image_rejected": 1, "kept": 3}
    assert ds.summary() == ("skipped bad_text: 1 (row 1), bad_json: 1 (row 2), missing_answer: 1 (row 5), "
                            "image_count: 1 (row 6), image_rejected: 1 (row 4)")


def test_prompt_column_of_bytes_is_named(processor):
    rows = [{"problem": b"Q \xff", "images": [], "answer": "1"}, {"problem": "Q", "images": [], "answer": "1"}]
    with pytest.raises(DataError, match=r"row 0: column 'problem' is not UTF-8 text"):
        PromptDataset(_table(rows), DataConfig(format_prompt="none"), processor, "t")


@pytest.mark.parametrize("kind", ["jsonl_empty", "jsonl_blank", "parquet", "disk", "synthetic"])
def test_empty_dataset_says_0_rows_and_names_the_file(tmp_path, processor, kind):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = DataConfig(format_prompt="none")
    if kind == "jsonl_empty":
        src = tmp_path / "e.jsonl"
        src.write_text("")
    elif kind == "jsonl_blank":
        src = tmp_path / "b.jsonl"
        src.write_text("\n\n")
    elif kind == "parquet":
        src = tmp_path / "e.parquet"
        pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), src)
    elif kind == "disk":
        src = tmp_path / "d"
        datasets.Dataset.from_dict({"problem": [], "images": [], "answer": []}).save_to_disk(str(src))
    else:
        src, cfg.synthetic_train_size = "synthetic", 0
    with pytest.raises(DataError, match=rf"data source '{src}'.* 0 rows"):
        load_prompt_dataset(str(src), cfg, processor)
