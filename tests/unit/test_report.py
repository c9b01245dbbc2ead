"""``megatron-papo report``: two hand-written runs (metrics.jsonl with known numbers) -> PNG plots with both runs
overlaid (the plotted points are the recorded ones) and a Markdown table whose numbers are derived by hand."""

from __future__ import annotations

import json

import pytest

from megatron_papo.report import build_figures, load_run, markdown


def _write(run_dir, rows, tail=""):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    a = []
    for s in range(1, 13):
        a.append({"step": s, "reward/mean": s / 100, "reward/accuracy": s / 200, "kl/prcp": 0.1, "entropy/ori": 1 - s / 100,
                  "entropy/aug": 1.2, "rollout/logprob_gap": 5e-7, "optim/lr": 1e-4, "timing/rollout": 2.0,
                  "timing/update": 1.0, "timing/sync": 0.5, "timing/step": 7.5 if s == 1 else 3.5, "note": "text"})
        if s % 4 == 0:  # evaluation rows: two benchmarks and their macro average
            geo, syn = {4: 0.2, 8: 0.6, 12: 0.4}[s], {4: 0.4, 8: 0.6, 12: 0.6}[s]
            a.append({"step": s, "eval/geo/accuracy": geo, "eval/syn/accuracy": syn, "eval/accuracy": (geo + syn) / 2,
                      "eval/best_accuracy": 0.0, "eval/final": 0.0})
    b = [{"step": s, "reward/mean": 0.5, "reward/accuracy": 0.25, "entropy/ori": 0.9, "rollout/logprob_gap": 1e-6,
          "timing/rollout": 1.0, "timing/update": 2.0, "timing/step": 3.0, "reward/failed": float("nan")}
         for s in range(1, 6)]
    b.append({"step": 5, "eval/test/accuracy": 0.25, "eval/accuracy": 0.25})
    return _write(tmp_path / "papo", a, tail='{"step": 13, "reward/me'), _write(tmp_path / "grpo", b)


def _cells(md: str, label: str) -> list[str]:
    summary = md.split("## ")[0]  # the first table
    (line,) = [ln for ln in summary.splitlines() if ln.startswith(f"| {label} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_numbers_are_the_hand_derived_ones(runs):
    a, b = load_run(runs[0]), load_run(runs[1])
    md = markdown([a, b], last=10)
    head = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert head == ["run", "steps", "reward (last 10)", "train acc (last 10)", "KL_prcp (last 10)", "entropy ori (last 10)",
                    "entropy aug (last 10)", "log-prob gap (last 10)", "eval acc (final)", "eval acc (best)",
                    "best at step", "step s (mean)", "rollout s", "update s", "sync s"]
    # papo: steps 3..12 averaged: reward (3+..+12)/10/100 = 0.075, acc 0.0375, entropy 1 - 0.075; eval 0.3, 0.6, 0.5
    # -> final 0.5, best 0.6 at step 8; step time (7.5 + 11 * 3.5) / 12 = 3.8333
    assert dict(zip(head, _cells(md, "papo"))) == {
        "run": "papo", "steps": "12", "reward (last 10)": "0.075", "train acc (last 10)": "0.0375",
        "KL_prcp (last 10)": "0.1", "entropy ori (last 10)": "0.925", "entropy aug (last 10)": "1.2",
        "log-prob gap (last 10)": "5e-07", "eval acc (final)": "0.5", "eval acc (best)": "0.6", "best at step": "8",
        "step s (mean)": "3.833", "rollout s": "2", "update s": "1", "sync s": "0.5"}
    assert _cells(md, "grpo") == ["grpo", "5", "0.5", "0.25", "–", "0.9", "–", "1e-06", "0.25", "0.25", "5", "3", "1", "2",
                                  "–"]
    per_bench = md.split("## Last evaluation per benchmark")[1]
    assert "| run | step | geo | syn | test | macro |" in per_bench
    assert "| papo | 12 | 0.4 | 0.6 | – | 0.5 |" in per_bench and "| grpo | 5 | – | – | 0.25 | 0.25 |" in per_bench


def test_figures_overlay_both_runs_with_the_recorded_points(runs):
    a, b = load_run(runs[0]), load_run(runs[1])
    figs = build_figures([a, b])
    assert set(figs) == {"reward", "accuracy", "kl_prcp", "entropy", "logprob_gap", "lr", "eval", "timing"}

    def lines(name):
        return {ax.get_title(): {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
                for ax in figs[name].axes if ax.get_visible()}

    reward = lines("reward")["reward"]
    assert reward["papo"] == (list(range(1, 13)), [s / 100 for s in range(1, 13)])
    assert reward["grpo"] == ([1, 2, 3, 4, 5], [0.5] * 5)
    assert set(lines("kl_prcp")["KL_prcp"]) == {"papo"}  # the GRPO run has no perception KL
    ent = lines("entropy")
    assert set(ent) == {"original view", "masked view"} and set(ent["original view"]) == {"papo", "grpo"}
    ev = lines("eval")
    assert set(ev) == {"geo", "syn", "test", "macro average"}
    assert ev["geo"]["papo"] == ([4, 8, 12], [0.2, 0.6, 0.4]) and ev["test"]["grpo"] == ([5], [0.25])
    assert ev["macro average"]["papo"][1] == pytest.approx([0.3, 0.6, 0.5])
    timing = lines("timing")
    assert set(timing) == {"rollout", "update", "sync", "step"} and timing["step"]["papo"][1][:2] == [7.5, 3.5]
    assert [ax.get_yscale() for ax in figs["logprob_gap"].axes] == ["log"]


def test_cli_writes_pngs_and_markdown(runs, tmp_path, capsys):
    from PIL import Image

    from megatron_papo.cli import main

    out = tmp_path / "report"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out), "--labels", "PAPO,GRPO", "--last", "5"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["report.md", *(f"{n}.png" for n in ("reward", "accuracy", "kl_prcp", "entropy", "logprob_gap",
                                                                 "lr", "eval", "timing"))])
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
    md = (out / "report.md").read_text()
    assert "| PAPO | 12 | 0.1 |" in md  # reward over the last 5 steps: (8+..+12)/5/100
    assert "![eval](eval.png)" in md and md.split("## Plots")[0] in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2  # one-line error, no traceback
