"""``megatron-papo report RUN_DIR [RUN_DIR ...]``: PNG plots of one or more runs overlaid, plus a Markdown summary.

Reads each run's ``metrics.jsonl`` and writes to ``--out`` (default ``RUN_DIR/report`` for one run,
``./report`` for several):

- ``reward.png``, ``accuracy.png`` (train), ``kl_prcp.png``, ``entropy.png`` (original and masked view),
  ``logprob_gap.png`` (engine vs trainer), ``lr.png``, ``eval.png`` (one panel per benchmark and the macro
  average), ``timing.png`` (seconds per phase of a step); a figure is skipped when no run recorded its metric;
- ``report.md``: one row per run — last step, means over the last ``--last`` training steps (reward, train
  accuracy, KL_prcp, entropies, log-prob gap), the final and best evaluation accuracy (with its step), the
  mean step time and the mean seconds of each phase — then the last evaluation per benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_papo.config.base import ConfigError

# figure name -> (title, [(panel title, metric key)]); panels share a figure, runs are overlaid in each panel
FIGURES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "reward": ("reward (mean over samples)", [("reward", "reward/mean")]),
    "accuracy": ("train accuracy", [("accuracy", "reward/accuracy")]),
    "kl_prcp": ("KL_prcp (original vs masked view)", [("KL_prcp", "kl/prcp")]),
    "entropy": ("entropies", [("original view", "entropy/ori"), ("masked view", "entropy/aug")]),
    "logprob_gap": ("engine vs trainer log-prob gap (max)", [("log-prob gap", "rollout/logprob_gap")]),
    "lr": ("learning rate", [("lr", "optim/lr")]),
}
PHASES = ("rollout", "old_logprob", "aug_logprob", "ref_logprob", "update", "sync", "step")
_EVAL_KEYS = ("accuracy", "format", "majority_baseline", "questions", "best_accuracy", "best_step", "final")


@dataclass
class Run:
    """One run's metrics: ``series[key] = [(step, value), ...]`` sorted by step (the last value of a step wins)."""

    label: str
    path: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series.get(key, [])]

    def benchmarks(self) -> list[str]:
        """Benchmark names with ``eval/<name>/accuracy``, in first-seen order."""
        names = [k.split("/")[1] for k in self.series if k.startswith("eval/") and k.endswith("/accuracy")
                 and k.count("/") == 2]
        return list(dict.fromkeys(names))


def load_run(run_dir: str | Path, label: Optional[str] = None) -> Run:
    """Parse ``RUN_DIR/metrics.jsonl`` (a half-written last line is ignored)."""
    path = Path(run_dir)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise ConfigError(f"report: {run_dir} has no metrics.jsonl; pass run directories of megatron-papo train")
    per_key: dict[str, dict[int, float]] = {}
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                per_key.setdefault(k, {})[step] = float(v)
    series = {k: sorted(d.items()) for k, d in per_key.items()}
    return Run(label or (path.name if path.is_dir() else path.parent.name), path, series)


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def summarize(run: Run, last: int = 10) -> dict[str, Optional[float]]:
    """The summary row of one run (None where the run recorded nothing)."""
    tail = {k: _mean(run.values(k)[-last:]) for k in ("reward/mean", "reward/accuracy", "kl/prcp", "entropy/ori",
                                                       "entropy/aug", "rollout/logprob_gap")}
    steps = [s for s, _ in run.series.get("reward/mean", [])]
    evals = run.series.get("eval/accuracy", [])
    best = max(evals, key=lambda sv: (sv[1], -sv[0])) if evals else None  # the first step reaching the maximum
    out: dict[str, Optional[float]] = {"steps": float(steps[-1]) if steps else None, **tail,
                                       "eval_final": evals[-1][1] if evals else None,
                                       "eval_best": best[1] if best else None, "eval_best_step": float(best[0]) if best else None}
    for ph in PHASES:
        out[f"timing/{ph}"] = _mean(run.values(f"timing/{ph}"))
    return out


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def markdown(runs: Sequence[Run], last: int = 10) -> str:
    """The Markdown summary: one row per run, then the last evaluation per benchmark."""
    rows = [(r, summarize(r, last)) for r in runs]
    phases = [ph for ph in PHASES if ph != "step" and any(s[f"timing/{ph}"] is not None for _, s in rows)]
    head = ["run", "steps", f"reward (last {last})", f"train acc (last {last})", f"KL_prcp (last {last})",
            f"entropy ori (last {last})", f"entropy aug (last {last})", f"log-prob gap (last {last})", "eval acc (final)",
            "eval acc (best)", "best at step", "step s (mean)", *[f"{ph} s" for ph in phases]]
    lines = ["# Run report", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, s in rows:
        cells = [r.label, _fmt(s["steps"]), _fmt(s["reward/mean"]), _fmt(s["reward/accuracy"]), _fmt(s["kl/prcp"]),
                 _fmt(s["entropy/ori"]), _fmt(s["entropy/aug"]), _fmt(s["rollout/logprob_gap"]), _fmt(s["eval_final"]),
                 _fmt(s["eval_best"]), _fmt(s["eval_best_step"]), _fmt(s["timing/step"]),
                 *[_fmt(s[f"timing/{ph}"]) for ph in phases]]
        lines.append("| " + " | ".join(cells) + " |")
    names = list(dict.fromkeys(n for r in runs for n in r.benchmarks()))
    if names:
        lines += ["", "## Last evaluation per benchmark (avg@k accuracy)", "",
                  "| run | step | " + " | ".join(names) + " | macro |", "|" + "---|" * (len(names) + 3)]
        for r in runs:
            evals = r.series.get("eval/accuracy", [])
            if not evals:
                continue
            step = evals[-1][0]
            per = [dict(r.series.get(f"eval/{n}/accuracy", [])).get(step) for n in names]
            lines.append(f"| {r.label} | {step} | " + " | ".join(_fmt(v) for v in per) + f" | {_fmt(evals[-1][1])} |")
    return "\n".join(lines) + "\n"


def build_figures(runs: Sequence[Run]) -> dict[str, Any]:
    """``{name: matplotlib Figure}`` with every run overlaid in each panel; figures nobody has data for are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = dict(FIGURES)
    names = list(dict.fromkeys(n for r in runs for n in r.benchmarks()))
    specs["eval"] = ("evaluation accuracy (avg@k)", [(n, f"eval/{n}/accuracy") for n in names]
                     + [("macro average" if names else "accuracy", "eval/accuracy")])
    specs["timing"] = ("seconds per step phase", [(ph, f"timing/{ph}") for ph in PHASES])
    figs = {}
    for name, (title, panels) in specs.items():
        panels = [(t, k) for t, k in panels if any(r.series.get(k) for r in runs)]
        if not panels:
            continue
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
        for ax, (ptitle, key) in zip(axes.flat, panels):
            for i, r in enumerate(runs):  # one colour per run in every panel
                pts = r.series.get(key, [])
                if pts:
                    ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 30 else None,
                            markersize=3, label=r.label, color=f"C{i % 10}")
            ax.set_title(ptitle)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if key == "rollout/logprob_gap" and all(v > 0 for r in runs for v in r.values(key)):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
        figs[name] = fig
    return figs


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Optional[Sequence[str]] = None,
                 last: int = 10) -> dict[str, Path]:
    """Render every figure and ``report.md`` into ``out``; returns ``{name: path}``."""
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"report: {len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    if len({r.label for r in runs}) != len(runs):  # same dir names in different places: label by path
        runs = [Run(str(r.path), r.path, r.series) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in build_figures(runs).items():
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)
    paths["report"] = out / "report.md"
    body = markdown(runs, last)
    figs = [n for n in paths if n != "report"]
    body += "\n## Plots\n\n" + "\n".join(f"![{n}]({n}.png)" for n in figs) + "\n"
    paths["report"].write_text(body)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``megatron-papo report``: plots + Markdown summary of one or more runs."""
    p = argparse.ArgumentParser(prog="megatron-papo report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report for one run, ./report otherwise)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run (default: dir names)")
    p.add_argument("--last", type=int, default=10, help="training steps averaged in the summary table")
    args = p.parse_args(argv)
    out = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "report")
    paths = write_report(args.runs, out, labels=args.labels.split(",") if args.labels else None, last=args.last)
    print(paths["report"].read_text())
    print(f"wrote {len(paths) - 1} plots and {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
