"""Prompt datasets (HF ``datasets``): loading, per-row validation, length filtering, resumable order.

Sources: ``synthetic`` (the embedded task, ``data/synthetic.py``), a ``.parquet`` file, a ``.jsonl``/
``.json`` file (relative image paths resolved against the file's directory), or a directory written
by ``save_to_disk`` (a ``DatasetDict`` picks ``data.train_split``/``test_split``; a lone split is used
as is). Columns ``cfg.prompt_key``/``image_key``/``answer_key`` are renamed to the canonical
``problem``/``images``/``answer``; ``uid`` is the row's index in the source (stable across runs and resumes).

Validation at load (one pass; images are decoded once and dropped), each kind counted in
:attr:`PromptDataset.stats`: ``bad_text`` (a JSON line that is not UTF-8, a prompt of undecodable bytes),
``bad_json`` (a malformed JSON line), ``missing_answer`` (missing answer or prompt), ``image_count`` (``<image>``
count != number of images; 0 placeholders is allowed: images go first), ``bad_image`` (undecodable image),
``image_rejected`` (an image the processor refuses, e.g. aspect ratio over 200 or a side too small).
Each is a one-line :class:`~megatron_papo.errors.DataError` naming the file, the row and the fix, or
skip-and-count with ``data.on_bad_row=skip`` (the warning lists the first row ids per kind). Prompts longer
than ``data.max_prompt_length`` tokens (image tokens included, counted exactly as the processor expands
them) are filtered and counted (``overlong``). A source with 0 rows is a DataError saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_papo.config.base import ConfigError
from megatron_papo.config.data import DataConfig, pixel_range
from megatron_papo.data.images import ImageDecodeError, decode_image, resized_size
from megatron_papo.data.jsonl import read_jsonl
from megatron_papo.data.processing import PromptSample, encode_prompt
from megatron_papo.data.prompt import build_messages, count_placeholders, render_prompt
from megatron_papo.errors import DataError
from megatron_papo.utils.logging import get_logger

CANONICAL = ("problem", "images", "answer")
BAD_KINDS = ("bad_text", "bad_json", "missing_answer", "image_count", "bad_image", "image_rejected")
SHOW_IDS = 5  # row ids listed per kind in the skip summary
log = get_logger("data")


def load_table(source: str, cfg: DataConfig, split: str = "train") -> tuple[Any, Optional[Path]]:
    """Load ``source`` as a ``datasets.Dataset``; returns (dataset, base dir for relative image paths)."""
    table, base, _ = read_table(source, cfg, split)
    return table, base


def read_table(source: str, cfg: DataConfig, split: str = "train") -> tuple[Any, Optional[Path], dict[int, tuple[str, str]]]:
    """:func:`load_table` plus the rows the reader could not decode: a JSON-lines file with undecodable or
    malformed lines loads with empty rows there and ``bad[row] = (kind, message)``. 0 rows is a DataError."""
    table, base, bad = _load_table(source, cfg, split)
    if len(table) == 0:
        raise DataError(f"data source '{source}'{f' split {split}' if source != 'synthetic' else ''} has 0 rows; "
                        "point data.train/data.test at a file with rows")
    return table, base, bad


def _read_file(path: Path, suffix: str) -> tuple[Any, dict[int, tuple[str, str]]]:
    import datasets

    if path.stat().st_size == 0:
        raise DataError(f"data source '{path}' has 0 rows (the file is empty); point data.train/data.test at a file with rows")
    bad: dict[int, tuple[str, str]] = {}
    try:
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path)), bad
        if suffix == ".jsonl":
            rows, bad = read_jsonl(path)
            if not rows:
                raise DataError(f"data source '{path}' has 0 rows (only blank lines); point data.train/data.test at a "
                                "file with rows")
            if bad:  # datasets would fail on the whole file; keep the good rows, row numbers unchanged
                return datasets.Dataset.from_list([r if r is not None else {} for r in rows]), bad
        return datasets.Dataset.from_json(str(path)), bad
    except DataError:
        raise
    except Exception as e:
        cause = e.__cause__ or e.__context__ or e
        if "BatchSize must be greater than 0" in str(cause) or isinstance(e, StopIteration):
            raise DataError(f"data source '{path}' has 0 rows; point data.train/data.test at a file with rows") from None
        raise DataError(f"data source '{path}' cannot be read as {suffix}: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None


def _load_table(source: str, cfg: DataConfig, split: str) -> tuple[Any, Optional[Path], dict[int, tuple[str, str]]]:
    import datasets

    if source == "synthetic":
        from megatron_papo.data.synthetic import build_synthetic_dataset

        if split not in ("train", "test"):
            raise ConfigError(f"synthetic data has splits train/test, got '{split}'")
        n = cfg.synthetic_train_size if split == "train" else cfg.synthetic_test_size
        if n < 1:
            raise DataError(f"data source 'synthetic' split {split} has 0 rows (data.synthetic_{split}_size={n}); set it >= 1")
        return build_synthetic_dataset(n, cfg.seed, cfg.synthetic_image_size, split, task=cfg.synthetic_task,
                                       hint_p=cfg.synthetic_hint_p, conflict=cfg.synthetic_test_conflict,
                                       hint_repeat=cfg.synthetic_hint_repeat), None, {}
    path = Path(source)
    if path.is_dir():
        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as e:
            if _saved_without_rows(path):
                raise DataError(f"data source '{source}' has 0 rows (a save_to_disk dataset with no data files); point "
                                "data.train/data.test at a dataset with rows") from None
            raise ConfigError(f"data source '{source}' is a directory but not a save_to_disk dataset: {e}") from None
        if isinstance(obj, datasets.DatasetDict):
            if split in obj:
                obj = obj[split]
            elif not obj:
                raise DataError(f"data source '{source}' holds no splits (0 rows)")
            elif len(obj) == 1:
                obj = next(iter(obj.values()))
            else:
                raise ConfigError(f"data source '{source}' has splits {list(obj)}, not '{split}'; set data.train_split/test_split")
        return obj, path, {}
    if not path.is_file():
        raise ConfigError(f"data source '{source}' does not exist; expected 'synthetic', a .parquet/.jsonl file or a save_to_disk dir")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".jsonl", ".json"):
        table, bad = _read_file(path, suffix)
        return table, path.parent, bad
    raise ConfigError(f"data source '{source}': unsupported file type '{suffix}'; expected .parquet, .jsonl/.json or a dataset dir")


def _saved_without_rows(path: Path) -> bool:
    """A ``save_to_disk`` dir of an empty Dataset (``state.json`` listing no data files; datasets cannot load it)."""
    import json

    try:
        return not json.loads((path / "state.json").read_text()).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return False


def canonicalize(table: Any, cfg: DataConfig, source: str) -> Any:
    """Keep and rename the configured columns to ``problem``/``images``/``answer``; images undecoded."""
    import datasets

    keys = {"prompt_key": cfg.prompt_key, "image_key": cfg.image_key, "answer_key": cfg.answer_key}
    for knob, col in keys.items():
        if col not in table.column_names:
            raise ConfigError(f"data source '{source}': no column '{col}' (data.{knob}); columns: {table.column_names}")
    table = table.select_columns([cfg.prompt_key, cfg.image_key, cfg.answer_key])
    feat = table.features[cfg.image_key]
    if isinstance(feat, datasets.Image):
        table = table.cast_column(cfg.image_key, datasets.Image(decode=False))
    elif isinstance(getattr(feat, "feature", None), datasets.Image):
        table = table.cast_column(cfg.image_key, datasets.List(datasets.Image(decode=False)))
    renames = {old: new for old, new in zip((cfg.prompt_key, cfg.image_key, cfg.answer_key), CANONICAL) if old != new}
    return table.rename_columns(renames) if renames else table


def _as_list(images: Any) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


class PromptDataset:
    """A validated, length-filtered prompt table; ``encode(i)`` gives the i-th kept prompt.

    ``bad_rows[i] = (kind, message)``: rows the reader could not decode (kept as empty rows in ``table``)."""

    def __init__(self, table: Any, cfg: DataConfig, processor: Any, source: str, base_dir: Optional[Path] = None,
                 bad_rows: Optional[dict[int, tuple[str, str]]] = None):
        self.cfg, self.processor, self.source, self.base_dir = cfg, processor, source, base_dir
        self.pre_bad = dict(bad_rows or {})
        if len(table) == 0:
            raise DataError(f"data source '{source}' has 0 rows; point data.train/data.test at a file with rows")
        self.table = canonicalize(table, cfg, source)
        self.stats: dict[str, int] = {"rows": len(self.table), **{k: 0 for k in BAD_KINDS}, "overlong": 0}
        self.bad_ids: dict[str, list[int]] = {}  # first SHOW_IDS row ids per kind
        self.kept: list[int] = self._validate()
        self.stats["kept"] = len(self.kept)
        if not self.kept:
            raise ConfigError(f"data source '{source}': no usable rows left of {len(self.table)} ({self.summary()}); "
                            "check data.max_prompt_length and the data")
        if len(self.kept) < len(self.table):
            log.warning("data '%s': kept %d/%d rows; %s", source, len(self.kept), len(self.table), self.summary())

    def summary(self) -> str:
        """``skipped bad_text: 2 (rows 3, 9), overlong: 1`` for every kind with a count."""
        parts = []
        for kind, n in self.stats.items():
            if kind in ("rows", "kept") or not n:
                continue
            ids = self.bad_ids.get(kind, [])
            shown = (f" ({'row' if n == 1 else 'rows'} {', '.join(map(str, ids))}{', ...' if n > len(ids) else ''})"
                     if ids else "")
            parts.append(f"{kind}: {n}{shown}")
        return "skipped " + ", ".join(parts) if parts else "nothing skipped"

    def _bad(self, kind: str, msg: str, row: Optional[int] = None) -> None:
        if self.cfg.on_bad_row == "error":
            raise DataError(f"data '{self.source}' {msg}; fix the data or set data.on_bad_row=skip")
        self.stats[kind] += 1
        ids = self.bad_ids.setdefault(kind, [])
        if row is not None and len(ids) < SHOW_IDS:
            ids.append(row)

    def _text_len(self, problem: str, n_images: int, cache: dict) -> int:
        key = (problem, n_images)
        if key not in cache:
            text = render_prompt(self.processor, build_messages(problem, n_images, self.cfg.format_prompt))
            cache[key] = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        return cache[key]

    def _image_tokens(self, img: Any) -> int:
        lo, hi = pixel_range(self.cfg, self.source)
        w, h = resized_size(img.width, img.height, lo, hi)
        ip = self.processor.image_processor
        return ip.get_number_of_image_patches(h, w, {}) // (ip.merge_size ** 2)

    def _validate(self) -> list[int]:
        kept, cache = [], {}
        for i, row in enumerate(self.table):
            if i in self.pre_bad:
                kind, msg = self.pre_bad[i]
                self._bad(kind, msg, i)
                continue
            answer, problem, images = row["answer"], row["problem"], _as_list(row["images"])
            if answer is None or not str(answer).strip():
                self._bad("missing_answer", f"row {i}: missing answer in column '{self.cfg.answer_key}'", i)
                continue
            if isinstance(problem, (bytes, bytearray)):
                try:
                    problem = bytes(problem).decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad("bad_text", f"row {i}: column '{self.cfg.prompt_key}' is not UTF-8 text ({e.reason} at "
                              f"byte {e.start})", i)
                    continue
                self._bad("bad_text", f"row {i}: column '{self.cfg.prompt_key}' holds bytes, not text; store it as a "
                          "string column", i)
                continue
            if not isinstance(problem, str):
                self._bad("missing_answer", f"row {i}: column '{self.cfg.prompt_key}' is {type(problem).__name__}, not text", i)
                continue
            n_ph = count_placeholders(problem)
            if n_ph and n_ph != len(images):
                self._bad("image_count", f"row {i}: {n_ph} '<image>' placeholders in '{self.cfg.prompt_key}' but "
                          f"{len(images)} images in '{self.cfg.image_key}'", i)
                continue
            try:
                decoded = [decode_image(im, where=f"row {i} image {j}", base_dir=self.base_dir) for j, im in enumerate(images)]
            except ImageDecodeError as e:
                self._bad("bad_image", str(e), i)
                continue
            img_tokens = []
            for j, im in enumerate(decoded):
                try:
                    img_tokens.append(self._image_tokens(im))
                except ValueError as e:  # the processor's own checks (aspect ratio > 200, ...)
                    self._bad("image_rejected", f"row {i} image {j}: the image processor rejects it ({im.width}x"
                              f"{im.height} px): {e}", i)
                    break
            if len(img_tokens) < len(decoded):
                continue
            length = self._text_len(problem, len(images), cache) + sum(t - 1 for t in img_tokens)
            if length > self.cfg.max_prompt_length:
                self.stats["overlong"] += 1
                continue
            kept.append(i)
        return kept

    def __len__(self) -> int:
        return len(self.kept)

    def row(self, i: int) -> dict[str, Any]:
        """The i-th kept row as ``{uid, problem, images (undecoded forms), answer}``."""
        uid = self.kept[i]
        r = self.table[uid]
        return {"uid": uid, "problem": r["problem"], "images": _as_list(r["images"]), "answer": str(r["answer"])}

    def encode(self, i: int) -> PromptSample:
        """The i-th kept row encoded with the processor (a failure is a DataError naming file and row)."""
        try:
            return encode_prompt(self.processor, self.row(i), self.cfg, source=self.source, base_dir=self.base_dir)
        except ValueError as e:  # ImageDecodeError, the processor's checks, prompt building
            msg = str(e) if str(e).startswith("row ") else f"row {self.kept[i]}: {e}"
            raise DataError(f"data '{self.source}' {msg}; fix the data or set data.on_bad_row=skip") from None

    def answers(self) -> list[str]:
        """Ground-truth answers of the kept rows (for the majority baseline)."""
        col = self.table["answer"]
        return [str(col[u]) for u in self.kept]


def load_prompt_dataset(source: str, cfg: DataConfig, processor: Any, split: str = "train") -> PromptDataset:
    """Load, canonicalise, validate and length-filter ``source`` (see module docstring)."""
    table, base_dir, bad = read_table(source, cfg, split)
    return PromptDataset(table, cfg, processor, source, base_dir, bad_rows=bad)


def load_split(cfg: DataConfig, processor: Any, which: str) -> PromptDataset:
    """The configured ``"train"`` (``cfg.train``) or ``"test"`` (``cfg.test``) prompts."""
    if which not in ("train", "test"):
        raise ValueError(f"load_split: which must be 'train' or 'test', got '{which}'")
    source = cfg.train if which == "train" else cfg.test
    split = which if source == "synthetic" else (cfg.train_split if which == "train" else cfg.test_split)
    return load_prompt_dataset(source, cfg, processor, split)


class EpochSampler:
    """Deterministic, resumable batch order: a fresh seeded permutation per epoch, fixed-size batches.

    Epoch ``e`` uses ``np.random.default_rng([seed, e]).permutation(n)`` (identity when not shuffling);
    the incomplete tail of an epoch is dropped (like PAPO's ``drop_last=True``), so a batch never mixes
    epochs. ``state_dict() == {"epoch", "index"}`` (index = position in the epoch's order) makes resume exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size < 1 or n < batch_size:
            raise ConfigError(f"sampler: batch of {batch_size} prompts needs at least that many rows, dataset has {n}; "
                              "lower the prompt batch size or add data")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch."""
        return self.n // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """Row positions in the order of ``epoch``."""
        if self._order_epoch != epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                           else np.arange(self.n))
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """The next batch of row positions; advances the state."""
        if self.index + self.batch_size > self.n:
            self.epoch, self.index = self.epoch + 1, 0
        out = self.order(self.epoch)[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return [int(x) for x in out]

    def state_dict(self) -> dict[str, int]:
        """Position to resume from."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.n:
            raise ValueError(f"sampler state {state} is out of range for {self.n} rows")
        self.epoch, self.index = epoch, index


class PromptLoader:
    """Batches of encoded prompts: ``next_batch()`` -> list of :class:`PromptSample` (each with a stable uid)."""

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), batch_size, seed, shuffle)

    def next_batch(self) -> list[PromptSample]:
        """Encode the next batch of prompts."""
        return [self.dataset.encode(i) for i in self.sampler.next_indices()]

    @property
    def epoch(self) -> int:
        """Current epoch (0-based)."""
        return self.sampler.epoch

    def state_dict(self) -> dict[str, int]:
        """Sampler position (``epoch``, ``index``)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the sampler position."""
        self.sampler.load_state_dict(state)


def encode_all(dataset: PromptDataset, indices: Optional[Sequence[int]] = None) -> list[PromptSample]:
    """Encode the given kept-row positions (all by default), e.g. for evaluation."""
    return [dataset.encode(i) for i in (range(len(dataset)) if indices is None else indices)]
