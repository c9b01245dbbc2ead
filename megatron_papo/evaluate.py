"""avg@k evaluation through the rollout engine: per-question accuracy averaged over k samples, then over questions.

One code path (:func:`evaluate_benchmarks`) serves in-training validation (:class:`Validator`: every benchmark
of ``eval_datasets`` every ``eval_every`` steps and at the end, ``eval/<name>/accuracy`` etc. in the metrics) and
``megatron-papo eval --model HF_DIR --data [NAME=]SOURCE ... --n 8`` for PAPO_eval-style benchmark datasets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_papo.config.base import ConfigError
from megatron_papo.utils.logging import get_logger

log = get_logger("eval")


def majority_baseline(answers: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent ground truth."""
    if not answers:
        return 0.0
    counts = Counter(a.strip().lower() for a in answers)
    return counts.most_common(1)[0][1] / len(answers)


def score_questions(engine: Any, samples: Sequence[Any], reward_fn: Any, *, n: int, sampling: dict[str, Any],
                    seed: int) -> list[tuple[float, float, str]]:
    """``(accuracy averaged over n samples, format rate, ground truth)`` of each question, in order."""
    from megatron_papo.rewards import score
    from megatron_papo.rollout_phase import sample_seed

    seeds = [[sample_seed(seed, 0, s.uid, k) for k in range(n)] for s in samples]
    outs = engine.generate([(s.prompt, s.images) for s in samples], n=n, sampling=sampling, seeds=seeds)
    tok = getattr(engine, "tokenizer", None)
    rows = []
    for s, res in zip(samples, outs):
        texts = [r.text if getattr(r, "text", None) is not None else tok.decode(r.token_ids, skip_special_tokens=True) for r in res]
        rw = score(reward_fn, texts, [s.answer] * len(texts), [f"eval/uid{s.uid}/{k}" for k in range(len(texts))])
        rows.append((sum(r.get("accuracy", 0.0) for r in rw) / len(rw), sum(r.get("format", 0.0) for r in rw) / len(rw),
                     s.answer))
    return rows


def summarize(rows: Sequence[tuple[float, float, str]], n: int) -> dict[str, float]:
    """avg@n accuracy, format rate and majority baseline over per-question rows (:func:`score_questions`)."""
    m = max(1, len(rows))
    return {"accuracy": sum(r[0] for r in rows) / m, "format": sum(r[1] for r in rows) / m,
            "majority_baseline": majority_baseline([r[2] for r in rows]), "questions": float(len(rows)), "n": float(n)}


def evaluate_dataset(engine: Any, dataset: Any, reward_fn: Any, *, n: int, sampling: dict[str, Any], seed: int,
                     batch_size: int = 64) -> dict[str, float]:
    """avg@n accuracy (and format rate) of ``engine`` on every prompt of a PromptDataset."""
    return summarize(dataset_rows(engine, dataset, reward_fn, n=n, sampling=sampling, seed=seed, batch_size=batch_size), n)


def dataset_rows(engine: Any, dataset: Any, reward_fn: Any, *, n: int, sampling: dict[str, Any], seed: int,
                 batch_size: int = 64) -> list[tuple[float, float, str]]:
    """:func:`score_questions` rows of every prompt of a dataset, in order. ``engine`` is one rollout engine, or a
    :class:`~megatron_papo.rollout.fleet.RolloutFleet` that splits the questions over its engines (collective)."""
    if hasattr(engine, "score_dataset"):
        return engine.score_dataset(dataset, reward_fn, n=n, sampling=sampling, seed=seed, batch_size=batch_size)
    rows: list[tuple[float, float, str]] = []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset.encode(i) for i in range(start, min(len(dataset), start + batch_size))]
        rows += score_questions(engine, samples, reward_fn, n=n, sampling=sampling, seed=seed)
    return rows


@dataclass(frozen=True)
class Benchmark:
    """One validation benchmark: a metric-friendly name and a data source."""

    name: str
    source: str


_NAME = re.compile(r"[A-Za-z0-9_.@+\-]+")


def parse_benchmarks(entries: Sequence[str], default_source: str, *, where: str = "eval_datasets",
                     bare_paths: bool = False) -> list[Benchmark]:
    """``name=source`` entries -> benchmarks (no entries: one benchmark ``test`` on ``default_source``).

    A bare ``source`` is named by itself: allowed for names without ``/`` (``synthetic``), and for any path when
    ``bare_paths`` (the eval CLI). Names must be unique and fit in a metric key (``eval/<name>/accuracy``).
    """
    if not entries:
        return [Benchmark("test", default_source)]
    out: list[Benchmark] = []
    for entry in entries:
        name, sep, source = entry.partition("=")
        if not sep:
            name, source = entry, entry
            if not bare_paths and not _NAME.fullmatch(name):
                raise ConfigError(f"{where}: entry '{entry}' needs a name; write name=source (e.g. geo3k={entry})")
        elif not _NAME.fullmatch(name) or not source:
            raise ConfigError(f"{where}: entry '{entry}' is not name=source with a name of letters, digits and _.@+- "
                              "(e.g. mathverse=/data/mathverse.parquet)")
        if any(b.name == name for b in out):
            raise ConfigError(f"{where}: benchmark name '{name}' appears twice; give each entry its own name")
        out.append(Benchmark(name, source))
    return out


def load_benchmarks(benchmarks: Sequence[Benchmark], data_cfg: Any, processor: Any,
                    split: Optional[str] = None) -> dict[str, Any]:
    """Load (and validate: paths, schema, images) every benchmark's prompts before any engine work.

    ``split``: the split of a DatasetDict dir (default ``data.test_split``); the synthetic source is its test split.
    """
    from megatron_papo.data.dataset import load_prompt_dataset

    def which(b: Benchmark) -> str:
        return split if split is not None else ("test" if b.source == "synthetic" else data_cfg.test_split)

    return {b.name: load_prompt_dataset(b.source, data_cfg, processor, which(b)) for b in benchmarks}


def evaluate_shortcut(engine: Any, dataset: Any, reward_fn: Any, *, n: int, sampling: dict[str, Any],
                      seed: int) -> dict[str, float]:
    """The shortcut task's held-out metrics (data/synthetic.py): accuracy on the agree and conflict parts, how
    often a conflict answer copies the hint, accuracy with every image blacked out on the same prompts
    (``image_reliance`` = accuracy - that), and the majority and hint-following baselines."""
    from megatron_papo.data.synthetic import PromptView, shortcut_parts, shortcut_summary

    agree, conflict = shortcut_parts(dataset)
    answers = dataset.answers()
    kw = dict(n=n, sampling=sampling, seed=seed)
    parts = {name: evaluate_dataset(engine, PromptView(dataset, idx, **opt), reward_fn, **kw) if idx else None
             for name, idx, opt in (("agree", agree, {}), ("conflict", conflict, {}),
                                    ("conflict_hint", conflict, {"answer_hint": True}),
                                    ("blank", agree + conflict, {"blank": True}))}
    res = shortcut_summary({k: (v["accuracy"], int(v["questions"])) if v else (0.0, 0) for k, v in parts.items()},
                           answers=[answers[i] for i in agree + conflict])
    res["format"] = sum(v["format"] * v["questions"] for k, v in parts.items() if v and k in ("agree", "conflict")) / max(
        1, len(agree) + len(conflict))
    res["n"] = float(n)
    log.info("shortcut eval: accuracy %.3f (agree %.3f, conflict %.3f; conflict answers copying the hint %.3f), blank-image "
             "accuracy %.3f, image reliance %+.3f | baselines: majority %.3f, hint-following %.3f (agree 1, conflict 0)",
             res["accuracy"], res["accuracy_agree"], res["accuracy_conflict"], res["hint_follow_conflict"],
             res["accuracy_masked"], res["image_reliance"], res["majority_baseline"], res["hint_baseline"])
    return res


def evaluate_benchmarks(engine: Any, datasets: dict[str, Any], reward_fn: Any, *, n: int, sampling: dict[str, Any],
                        seed: int, shortcut: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """avg@n per benchmark (one :func:`evaluate_dataset` each), plus ``macro`` when there are several. The
    benchmarks named in ``shortcut`` (the synthetic shortcut task) get :func:`evaluate_shortcut`'s metrics.

    The one code path of ``megatron-papo eval`` and in-training validation (:class:`Validator`).
    """
    results = {name: (evaluate_shortcut if name in shortcut else evaluate_dataset)(engine, ds, reward_fn, n=n,
                                                                                    sampling=sampling, seed=seed)
               for name, ds in datasets.items()}
    if len(results) > 1:
        results["macro"] = macro_average(results)
    return results


def macro_average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean of accuracy, format and majority baseline over benchmarks (each counts once)."""
    rows = [r for name, r in results.items() if name != "macro"]
    keys = ("accuracy", "format", "majority_baseline")
    out = {k: sum(r[k] for r in rows) / max(1, len(rows)) for k in keys}
    out["questions"] = float(sum(r["questions"] for r in rows))
    return out


class Validator:
    """In-training validation: avg@k on every ``eval_datasets`` benchmark (or ``data.test``), every
    ``eval_every`` steps and at the end, through the same :func:`evaluate_benchmarks` as the eval CLI.

    Metrics: ``eval/<name>/{accuracy,format,majority_baseline,questions}``; ``eval/accuracy`` (and ``format``,
    ``majority_baseline``) = the macro average over benchmarks (= the benchmark itself when there is one);
    ``eval/best_accuracy`` / ``eval/best_step``: the best macro accuracy so far and its step (saved with the
    checkpoint: :meth:`state_dict`). Datasets load on first use.
    """

    def __init__(self, cfg: Any, processor: Any, reward_fn: Any) -> None:
        self.cfg, self.processor, self.reward_fn = cfg, processor, reward_fn
        self.benchmarks = parse_benchmarks(cfg.eval_datasets, cfg.data.test)
        for b in self.benchmarks:  # a typo should stop the run now, not at the first evaluation
            if b.source != "synthetic" and not Path(b.source).exists():
                raise ConfigError(f"eval_datasets: benchmark '{b.name}': {b.source} does not exist; expected 'synthetic', "
                                  "a .parquet/.jsonl file or a save_to_disk dir")
        self._datasets: Optional[dict[str, Any]] = None
        self.best_accuracy: Optional[float] = None
        self.best_step: Optional[int] = None

    def sampling(self) -> tuple[dict[str, Any], int]:
        """The evaluation sampling settings and k (greedy decoding has one answer per question)."""
        r, cfg = self.cfg.rollout, self.cfg
        temperature = r.temperature if cfg.eval_temperature is None else cfg.eval_temperature
        sampling = {"temperature": temperature, "top_p": r.top_p, "top_k": r.top_k, "max_new_tokens": r.max_new_tokens}
        return sampling, 1 if temperature == 0 else max(1, cfg.eval_n)

    def __call__(self, engine: Any, step: int, final: bool = False) -> dict[str, float]:
        """Evaluate ``engine`` (anything with the rollout engine's ``generate``); returns the ``eval/*`` metrics."""
        if self._datasets is None:
            self._datasets = load_benchmarks(self.benchmarks, self.cfg.data, self.processor)
        sampling, n = self.sampling()
        res = evaluate_benchmarks(engine, self._datasets, self.reward_fn, n=n, sampling=sampling,
                                  seed=self.cfg.seed + 7919, shortcut=self.shortcut_benchmarks())
        return self.record(step, res, final)

    def shortcut_benchmarks(self) -> list[str]:
        """The benchmarks on the synthetic source when it is the shortcut task (``data.synthetic_task``)."""
        if self.cfg.data.synthetic_task != "shortcut":
            return []
        return [b.name for b in self.benchmarks if b.source == "synthetic"]

    def record(self, step: int, res: dict[str, dict[str, float]], final: bool = False) -> dict[str, float]:
        """Metrics of one evaluation (per benchmark, macro, best so far); logs one line."""
        macro = res.get("macro") or next(iter(res.values()))
        if self.best_accuracy is None or macro["accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_step = macro["accuracy"], step
        out = {f"eval/{k}": macro[k] for k in ("accuracy", "format", "majority_baseline")}
        for name, r in res.items():
            if name != "macro":  # every metric of the benchmark (the shortcut task adds its parts and baselines)
                out.update({f"eval/{name}/{k}": v for k, v in r.items() if k != "n"})
        if len(res) == 1:  # one benchmark: its extra metrics at the top level too (eval/accuracy_conflict ...)
            out.update({f"eval/{k}": v for k, v in macro.items() if k not in ("n", "questions")})
        out.update({"eval/best_accuracy": self.best_accuracy, "eval/best_step": float(self.best_step),
                    "eval/final": float(final)})
        per = ", ".join(f"{name} {r['accuracy']:.3f}" for name, r in res.items() if name != "macro")
        log.info("eval step %d: accuracy %.3f (majority baseline %.3f)%s; best %.3f at step %d", step,
                 macro["accuracy"], macro["majority_baseline"], f" [{per}]" if len(res) > 1 else "",
                 self.best_accuracy, self.best_step)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"best_accuracy": self.best_accuracy, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_accuracy, self.best_step = state.get("best_accuracy"), state.get("best_step")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``megatron-papo eval``: avg@k per benchmark (and their macro average), JSON + a markdown table."""
    p = argparse.ArgumentParser(prog="megatron-papo eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--data", required=True, nargs="+",
                   help="benchmarks, [NAME=]SOURCE: 'synthetic', .parquet/.jsonl, or dataset dirs (NAME defaults to SOURCE)")
    p.add_argument("--n", type=int, default=8, help="samples per question (avg@n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--reward", default="math", help="reward/grader: a name (math | synthetic) or path/to/file.py:fn")
    p.add_argument("--format-prompt", default="math_perception")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("overrides", nargs="*", help="data.* / rollout.* overrides, key=value")
    args = p.parse_args(argv)
    from transformers import AutoProcessor

    from megatron_papo.config import load_config
    from megatron_papo.rewards import build_reward_fn
    from megatron_papo.rollout_phase import make_engine

    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not an HF checkpoint directory (no config.json)")
    cfg = load_config(None, [f"data.format_prompt={args.format_prompt}", f"data.reward={args.reward}", *args.overrides])
    benchmarks = parse_benchmarks(args.data, "synthetic", where="--data", bare_paths=True)
    processor = AutoProcessor.from_pretrained(args.model)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    # load (and validate) every benchmark before the engine starts: a bad path or schema fails in seconds
    datasets = load_benchmarks(benchmarks, cfg.data, processor, split=args.split)
    reward_fn = build_reward_fn(cfg.data)
    try:
        with make_engine(cfg.rollout, args.model) as engine:
            results = evaluate_benchmarks(engine, datasets, reward_fn, n=args.n, sampling=sampling, seed=cfg.seed)
    finally:
        close = getattr(reward_fn, "close", None)
        if close is not None:
            close()
    table = [f"| benchmark | avg@{args.n} accuracy | format | majority baseline | questions |", "|---|---|---|---|---|"]
    for k, v in results.items():
        table.append(f"| {k} | {100 * v['accuracy']:.2f} | {100 * v['format']:.2f} | {100 * v['majority_baseline']:.2f} "
                     f"| {int(v['questions'])} |")
    print("\n".join(table))
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
