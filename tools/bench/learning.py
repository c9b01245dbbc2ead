"""PAPO vs GRPO learning comparison on the synthetic task (same seeds), reported as it comes out.

Runs ``megatron-papo train --config tiny_cpu`` once per (variant, seed) and collects the final
``eval/accuracy`` against ``eval/majority_baseline`` plus the last training KL_prcp and entropy.

    .venv/bin/python tools/bench/learning.py --seeds 1 2 --variants grpo papo_faithful papo_exact papo_faithful_ent
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {
    "grpo": ["algo.kl_prcp_coef=0.0"],
    "papo_faithful": [],  # the recipe: k3_sampled, detached masked view
    "papo_exact": ["algo.kl_prcp_estimator=exact"],
    "papo_faithful_ent": ["algo.ori_entropy_coef=0.01", "algo.aug_entropy_coef=0.01"],
    "papo_exact_ent": ["algo.kl_prcp_estimator=exact", "algo.ori_entropy_coef=0.01", "algo.aug_entropy_coef=0.01"],
}


def run_one(variant: str, seed: int, out_root: Path, extra: list[str]) -> dict:
    run_dir = out_root / f"{variant}_seed{seed}"
    cmd = [sys.executable, "-m", "megatron_papo.cli", "train", "--config", "tiny_cpu", f"run_dir={run_dir}", f"seed={seed}",
           f"data.seed={seed}", "logging.progress=false", "checkpoint.resume=never", *VARIANTS[variant], *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "seed": seed, "error": proc.stderr[-2000:]}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/accuracy" in r][-1]
    last = [r for r in rows if "reward/mean" in r][-1]
    return {"variant": variant, "seed": seed, "eval_accuracy": ev["eval/accuracy"], "majority_baseline": ev["eval/majority_baseline"],
            "margin": ev["eval/accuracy"] - ev["eval/majority_baseline"], "final_reward": last["reward/mean"],
            "final_kl_prcp": last.get("kl/prcp", 0.0), "final_entropy": last.get("entropy/ori"),
            "wall_s": sum(r.get("timing/step", 0.0) for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(REPO / "runs" / "learning"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    out_root = Path(args.out)
    results = [run_one(v, s, out_root, args.overrides) for v in args.variants for s in args.seeds]
    print("| variant | seed | eval acc | majority | margin | final KL_prcp | final H |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['seed']} | error | | | | |")
            continue
        print(f"| {r['variant']} | {r['seed']} | {r['eval_accuracy']:.3f} | {r['majority_baseline']:.3f} | {r['margin']:+.3f} "
              f"| {r['final_kl_prcp']:.4f} | {r['final_entropy']:.3f} |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
