"""GRPO vs PAPO variants on the synthetic tasks, same seeds, reported as mean +- std over seeds.

Runs ``megatron-papo train --config tiny_cpu`` once per (variant, seed), one run at a time, each in
``OUT/<task>_<variant>_s<seed>`` (``--reuse`` reads a run finished at ``--steps`` instead of training it again; a
run finished at fewer steps resumes from its final checkpoint, which repeats an uninterrupted run), then prints

- one row per run: the final held-out metrics, the train reward, the KL_prcp and entropy trajectory
  (mean of the first / last 10 steps, max) and the collapse warnings replayed on its metrics;
- one row per variant: mean +- std (sample std, ddof 1) over its seeds of every held-out metric;
- the verdict on conflict accuracy (shortcut task) or accuracy (colour task): a PAPO variant beats GRPO
  only if its mean exceeds GRPO's by more than the seed spread, std(GRPO) + std(variant), on >= 3 common seeds.

    .venv/bin/python tools/bench/learning.py --task shortcut --steps 100 --seeds 1 2 3 --variants grpo papo --out /tmp/l
    .venv/bin/python tools/bench/learning.py --task colour --steps 200 --seeds 1 --variants grpo papo_exact

The shortcut task (``data.synthetic_task=shortcut``, data/synthetic.py): the question carries a colour hint that
is right on 75 % of the train rows; the test split is half agree, half conflict. Metrics: ``eval/accuracy``,
``eval/accuracy_agree``, ``eval/accuracy_conflict``, ``eval/hint_follow_conflict`` (conflict answers that copy the
hint), ``eval/accuracy_masked`` (every image black) and ``eval/image_reliance`` = accuracy - accuracy_masked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron_papo.collapse import read_metrics, replay  # noqa: E402

G = "algo.kl_prcp_coef"
VARIANTS: dict[str, list[str]] = {
    "grpo": [f"{G}=0.0"],
    "grpo_monitor": [f"{G}=1e-9"],  # GRPO in effect, but the masked view is run so KL_prcp is measured
    "papo": [],  # the tiny_cpu recipe: gamma 0.005, k3_sampled, detached masked view, 14-px squares p=0.6
    "papo_g001": [f"{G}=0.001"],
    "papo_g02": [f"{G}=0.02"],  # the paper's 3B gamma
    "papo_g02_clip": [f"{G}=0.02", "algo.kl_prcp_clip=0.1"],
    "papo_g02_anneal": [f"{G}=0.02", "algo.kl_prcp_schedule=annealing"],
    "papo_g02_ent": [f"{G}=0.02", "algo.ori_entropy_coef=0.05", "algo.aug_entropy_coef=0.05"],  # paper 7B
    "papo_exact": ["algo.kl_prcp_estimator=exact"],
    "papo_live": ["algo.aug_mode=live"],
    "papo_blank": ["data.mask_prob=1.0"],  # the masked view is all black: KL_prcp = KL(image || no image)
    "papo_blank_g001": ["data.mask_prob=1.0", f"{G}=0.001"],
    "papo_blank_exact": ["data.mask_prob=1.0", "algo.kl_prcp_estimator=exact"],
    # the colour-task table of earlier README versions
    "papo_faithful": [],
    "papo_faithful_ent": ["algo.ori_entropy_coef=0.01", "algo.aug_entropy_coef=0.01"],
    "papo_exact_ent": ["algo.kl_prcp_estimator=exact", "algo.ori_entropy_coef=0.01", "algo.aug_entropy_coef=0.01"],
}
SHORTCUT_KEYS = ("accuracy", "accuracy_conflict", "accuracy_agree", "hint_follow_conflict", "accuracy_masked",
                 "image_reliance")
COLOUR_KEYS = ("accuracy",)


def run_dir(out: Path, task: str, variant: str, seed: int) -> Path:
    return out / f"{task}_{variant}_s{seed}"


def command(task: str, variant: str, seed: int, steps: int, rdir: Path, extra: list[str]) -> list[str]:
    """The exact training command of one run."""
    return [sys.executable, "-m", "megatron_papo.cli", "train", "--config", "tiny_cpu", f"run_dir={rdir}", f"seed={seed}",
            f"data.seed={seed}", f"total_steps={steps}", f"data.synthetic_task={task}", "logging.progress=false",
            "checkpoint.resume=auto", "checkpoint.save_every=0", *VARIANTS[variant], *extra]


def warm_start(out: Path, task: str, steps: int, seed: int, extra: list[str]) -> str:
    """Train (once; reused when present) the shared starting point: GRPO for ``steps`` steps with ``seed``.
    Returns the ``checkpoint.init_from`` override that starts every compared run from its final checkpoint."""
    rdir = out / f"{task}_warm{steps}_s{seed}"
    ckpt = rdir / "checkpoints" / f"step_{steps:06d}"
    if not ckpt.is_dir():
        cmd = command(task, "grpo", seed, steps, rdir, extra)
        print("warm start:", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not ckpt.is_dir():
            raise SystemExit(f"warm start failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return f"checkpoint.init_from={ckpt}"


def finished(rdir: Path, steps: int) -> bool:
    """The run reached ``steps`` and evaluated there (a shorter finished run is extended: it resumes from its checkpoint)."""
    path = rdir / "metrics.jsonl"
    if not path.is_file():
        return False
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return any(r.get("eval/final") == 1.0 and r.get("step") == steps for r in rows)


def _window(xs: list[float], first: bool, k: int = 10) -> float:
    part = xs[:k] if first else xs[-k:]
    return sum(part) / len(part) if part else float("nan")


def summarise(rdir: Path, variant: str, seed: int) -> dict:
    """The final eval metrics and the training trajectory summary of a finished run."""
    rows = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ev = [r for r in rows if r.get("eval/final") == 1.0][-1]  # the last: an extended run evaluated again
    train = read_metrics(rdir / "metrics.jsonl")
    kl = [r["kl/prcp"] for r in train if "kl/prcp" in r]
    h = [r["entropy/ori"] for r in train if "entropy/ori" in r]
    rew = [r["reward/accuracy"] for r in train]
    out = {"variant": variant, "seed": seed, "steps": train[-1]["step"] if train else 0,
           "eval": {k[5:]: v for k, v in ev.items() if k.startswith("eval/") and k != "eval/final"},
           "train_acc_last10": _window(rew, False), "h_first10": _window(h, True), "h_last10": _window(h, False),
           "warnings": [f"{w.signature}@{w.step}" for w in replay(train)],
           "wall_s": sum(r.get("timing/step", 0.0) for r in train)}
    if kl:
        out |= {"kl_first10": _window(kl, True), "kl_last10": _window(kl, False), "kl_max": max(kl)}
    return out


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def report(results: list[dict], task: str) -> str:
    """Markdown: per-run rows, per-variant mean +- std, and the verdict."""
    keys = SHORTCUT_KEYS if task == "shortcut" else COLOUR_KEYS
    short = {"accuracy": "acc", "accuracy_conflict": "conflict", "accuracy_agree": "agree",
             "hint_follow_conflict": "copies hint", "accuracy_masked": "blank-image acc", "image_reliance": "reliance"}
    ok = [r for r in results if "error" not in r]
    lines = ["| variant | seed | steps | " + " | ".join(short[k] for k in keys) +
             " | train acc (last 10) | KL_prcp first10 → last10 (max) | H first10 → last10 | warnings |",
             "|---|---|---|" + "---|" * len(keys) + "---|---|---|---|"]
    for r in ok:
        kl = (f"{r['kl_first10']:.3g} → {r['kl_last10']:.3g} ({r['kl_max']:.3g})" if "kl_first10" in r else "not measured")
        lines.append(f"| {r['variant']} | {r['seed']} | {r['steps']} | " + " | ".join(f"{r['eval'].get(k, float('nan')):.3f}" for k in keys)
                     + f" | {r['train_acc_last10']:.3f} | {kl} | {r['h_first10']:.3g} → {r['h_last10']:.3g} | "
                     f"{', '.join(r['warnings']) or '-'} |")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['seed']} | error: {r['error'].splitlines()[-1] if r['error'] else '?'} |")
    base = ok[0]["eval"] if ok else {}
    lines += ["", "| variant | seeds | " + " | ".join(short[k] for k in keys) + " | warned runs |",
              "|---|---|" + "---|" * len(keys) + "---|"]
    by_var: dict[str, list[dict]] = {}
    for r in ok:
        by_var.setdefault(r["variant"], []).append(r)
    for v, rs in by_var.items():
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(_ms([r["eval"][k] for r in rs if k in r["eval"]]) for k in keys)
                     + f" | {sum(bool(r['warnings']) for r in rs)}/{len(rs)} |")
    if base:
        extra = ["majority_baseline", "hint_baseline"] if task == "shortcut" else ["majority_baseline"]
        lines.append("\nbaselines (held-out): " + ", ".join(f"{k} {base[k]:.3f}" for k in extra if k in base)
                     + ("; hint-following: agree 1.000, conflict 0.000" if task == "shortcut" else ""))
    lines.append(verdict(by_var, "accuracy_conflict" if task == "shortcut" else "accuracy"))
    return "\n".join(lines)


def verdict(by_var: dict[str, list[dict]], key: str) -> str:
    """Does any PAPO variant beat GRPO on ``key`` by more than std(GRPO) + std(variant) over >= 3 common seeds?"""
    if "grpo" not in by_var:
        return "verdict: no GRPO runs"
    grpo = {r["seed"]: r["eval"][key] for r in by_var["grpo"]}
    out = []
    for v, rs in by_var.items():
        if v == "grpo":
            continue
        mine = {r["seed"]: r["eval"][key] for r in rs}
        seeds = sorted(set(mine) & set(grpo))
        if len(seeds) < 3:
            out.append(f"{v}: {len(seeds)} common seed(s) with grpo, no verdict (needs 3)")
            continue
        a, b = [grpo[s] for s in seeds], [mine[s] for s in seeds]
        diff, spread = statistics.mean(b) - statistics.mean(a), statistics.stdev(a) + statistics.stdev(b)
        wins = sum(y > x for x, y in zip(a, b))
        out.append(f"{v}: {key} {statistics.mean(b):.3f} vs grpo {statistics.mean(a):.3f}, diff {diff:+.3f}, seed spread "
                   f"{spread:.3f} -> {'BEATS GRPO' if diff > spread else 'does not beat GRPO'} (higher on {wins}/{len(seeds)} seeds)")
    return "verdict on " + key + ":\n" + "\n".join("- " + x for x in out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["shortcut", "colour"], default="shortcut")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=["grpo", "papo"], choices=list(VARIANTS))
    p.add_argument("--out", default=str(REPO / "runs" / "learning"))
    p.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of training them again")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs found")
    p.add_argument("--warm-steps", type=int, default=0,
                   help="start every run from the final checkpoint of one GRPO run of this many steps (0 = from scratch)")
    p.add_argument("--warm-seed", type=int, default=1, help="seed of the warm-start run (use compared seeds other than it)")
    p.add_argument("--eval-n", type=int, default=8,
                   help="held-out metrics as avg@N at temperature 1 (the paper's protocol is avg@8); 0 = greedy (tiny_cpu)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.eval_n:
        args.overrides = ["eval_temperature=1.0", f"eval_n={args.eval_n}", *args.overrides]
    if args.warm_steps and not args.report_only:
        args.overrides = [*args.overrides, warm_start(out, args.task, args.warm_steps, args.warm_seed, args.overrides)]
    results = []
    for v in args.variants:  # variant-major, one run at a time
        for s in args.seeds:
            rdir = run_dir(out, args.task, v, s)
            if not ((args.reuse or args.report_only) and finished(rdir, args.steps)):
                if args.report_only:
                    continue
                cmd = command(args.task, v, s, args.steps, rdir, args.overrides)
                print("running:", " ".join(cmd[1:]), flush=True)
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if proc.returncode != 0:
                    results.append({"variant": v, "seed": s, "error": proc.stderr[-2000:]})
                    continue
            results.append(summarise(rdir, v, s))
    print(report(results, args.task))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
