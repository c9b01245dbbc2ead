"""avg@k evaluation through the rollout engine: per-question accuracy averaged over k samples, then over questions.

Used at the end of training (``eval/accuracy``, ``eval/majority_baseline`` in metrics.jsonl) and by
``megatron-papo eval --model HF_DIR --data SPEC [SPEC ...] --n 8`` for PAPO_eval-style benchmark datasets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any, Optional, Sequence

from megatron_papo.config.base import ConfigError
from megatron_papo.utils.logging import get_logger

log = get_logger("evaluate")


def majority_baseline(answers: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent ground truth."""
    if not answers:
        return 0.0
    counts = Counter(a.strip().lower() for a in answers)
    return counts.most_common(1)[0][1] / len(answers)


def evaluate_dataset(engine: Any, dataset: Any, reward_fn: Any, *, n: int, sampling: dict[str, Any], seed: int,
                     batch_size: int = 64) -> dict[str, float]:
    """avg@n accuracy (and format rate) of ``engine`` on every prompt of a PromptDataset."""
    from megatron_papo.rollout_phase import sample_seed

    accs, fmts, answers = [], [], []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset.encode(i) for i in range(start, min(len(dataset), start + batch_size))]
        seeds = [[sample_seed(seed, 0, s.uid, k) for k in range(n)] for s in samples]
        outs = engine.generate([(s.prompt, s.images) for s in samples], n=n, sampling=sampling, seeds=seeds)
        tok = getattr(engine, "tokenizer", None)
        for s, res in zip(samples, outs):
            texts = [r.text if getattr(r, "text", None) is not None else tok.decode(r.token_ids, skip_special_tokens=True) for r in res]
            rw = reward_fn(texts, [s.answer] * len(texts))
            accs.append(sum(r.get("accuracy", 0.0) for r in rw) / len(rw))
            fmts.append(sum(r.get("format", 0.0) for r in rw) / len(rw))
            answers.append(s.answer)
    m = max(1, len(accs))
    return {"accuracy": sum(accs) / m, "format": sum(fmts) / m, "majority_baseline": majority_baseline(answers),
            "questions": float(len(accs)), "n": float(n)}


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


def evaluate_split(engine: Any, cfg: Any, processor: Any, reward_fn: Any, n: int = 1) -> dict[str, float]:
    """The trainer's end-of-run evaluation on ``cfg.data.test`` with the rollout sampling settings."""
    from megatron_papo.data.dataset import load_prompt_dataset

    ds = load_prompt_dataset(cfg.data.test, cfg.data, processor, "test")
    r = cfg.rollout
    temperature = r.temperature if cfg.eval_temperature is None else cfg.eval_temperature
    sampling = {"temperature": temperature, "top_p": r.top_p, "top_k": r.top_k, "max_new_tokens": r.max_new_tokens}
    n = 1 if temperature == 0 else max(n, cfg.eval_n)  # greedy decoding has one answer per question
    if cfg.data.test == "synthetic" and cfg.data.synthetic_task == "shortcut":
        return evaluate_shortcut(engine, ds, reward_fn, n=n, sampling=sampling, seed=cfg.seed + 7919)
    return evaluate_dataset(engine, ds, reward_fn, n=n, sampling=sampling, seed=cfg.seed + 7919)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``megatron-papo eval``: avg@k per benchmark, JSON + a markdown table."""
    p = argparse.ArgumentParser(prog="megatron-papo eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", help="benchmark sources: 'synthetic', .parquet/.jsonl, or dataset dirs")
    p.add_argument("--n", type=int, default=8, help="samples per question (avg@n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--reward", default="math", help="reward/grader name (math | synthetic)")
    p.add_argument("--format-prompt", default="math_perception")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("overrides", nargs="*", help="data.* / rollout.* overrides, key=value")
    args = p.parse_args(argv)
    from pathlib import Path

    from transformers import AutoProcessor

    from megatron_papo.config import load_config
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.rewards import get_reward_fn
    from megatron_papo.rollout_phase import make_engine

    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not an HF checkpoint directory (no config.json)")
    cfg = load_config(None, [f"data.format_prompt={args.format_prompt}", f"data.reward={args.reward}", *args.overrides])
    processor = AutoProcessor.from_pretrained(args.model)
    reward_fn = get_reward_fn(args.reward)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    results: dict[str, dict[str, float]] = {}
    # load (and validate) every benchmark before the engine starts: a bad path or schema fails in seconds
    datasets = {spec: load_prompt_dataset(spec, cfg.data, processor, args.split) for spec in args.data}
    with make_engine(cfg.rollout, args.model) as engine:
        for spec, ds in datasets.items():
            results[spec] = evaluate_dataset(engine, ds, reward_fn, n=args.n, sampling=sampling, seed=cfg.seed)
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
