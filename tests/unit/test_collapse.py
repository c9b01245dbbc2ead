"""The PAPO collapse detector (megatron_papo/collapse.py): hand-built metric sequences whose firing step is
derived independently below, and replays of metric traces recorded from real training runs (tests/data/)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from megatron_papo.collapse import CollapseDetector, read_metrics, replay


def _row(kl, h, h_aug=0.0, clip=0.0, step=None):
    r = {"kl/prcp": kl, "entropy/ori": h, "entropy/aug": h_aug, "clipfrac/high": clip}
    return r if step is None else {**r, "step": step}


def test_paper_signature_fires_on_the_jump_step():
    rows = [_row(0.01, 1.0, 1.0, 0.01) for _ in range(10)] + [_row(0.05, 1.2, 1.1, 0.02)] + [_row(0.01, 1.0, 1.0, 0.01)] * 5
    ws = replay(rows)
    assert [(w.signature, w.step, w.metric) for w in ws] == [("kl_jump", 11, "kl/prcp")]
    assert "entropy_coef" in ws[0].knob and "kl/prcp" in str(ws[0]) and "5.0x" in ws[0].message
    # the same jump with falling entropies is not the paper's signature (and too short to be a runaway)
    rows[10] = _row(0.05, 0.9, 1.1, 0.02)
    assert replay(rows) == []


def test_runaway_fires_once_where_the_window_means_say_so():
    steps = 80
    kl = 0.01 * np.exp(np.linspace(0, math.log(150), steps))  # 0.01 -> 1.5 nats/token
    h = np.linspace(2.0, 0.5, steps)
    ws = replay([_row(float(k), float(e)) for k, e in zip(kl, h)])
    assert [w.signature for w in ws] == ["kl_runaway"] and ws[0].metric == "kl/prcp"
    assert "kl_prcp_clip" in ws[0].knob and "kl_prcp_coef" in ws[0].knob
    # independent: first step t (1-based) where the mean of the last 10 KL values >= 3x the mean of the 10 values
    # 30 steps earlier and >= 0.3 (entropy falls everywhere), held for 5 consecutive steps -> warned at the 5th
    ok = [t for t in range(40, steps + 1) if kl[t - 10:t].mean() >= max(0.3, 3 * kl[t - 40:t - 30].mean())]
    assert ok[:5] == list(range(ok[0], ok[0] + 5)) and ws[0].step == ok[4]


@pytest.mark.parametrize("case", ["flat", "small", "entropy_rises", "no_kl", "nan"])
def test_runaway_silent(case):
    rng = np.random.default_rng(0)
    steps = 120
    h = np.linspace(2.0, 0.5, steps)
    if case == "flat":  # large but steady KL_prcp with noise, entropy falling
        kl = 0.8 + 0.2 * rng.standard_normal(steps).clip(-2, 2)
    elif case == "small":  # grows 100x but stays under the floor
        kl = 0.001 * np.exp(np.linspace(0, math.log(100), steps))
    else:
        kl = 0.01 * np.exp(np.linspace(0, math.log(150), steps))
    if case == "entropy_rises":
        h = h[::-1]
    rows = [_row(float(k), float(e)) for k, e in zip(kl, h)]
    if case == "no_kl":  # a GRPO run logs no kl/prcp
        rows = [{k: v for k, v in r.items() if k != "kl/prcp"} for r in rows]
    if case == "nan":
        rows = [{**r, "kl/prcp": float("nan")} for r in rows]
    assert replay(rows) == []


def test_rearms_after_a_clear_window():
    up = [_row(0.01 * 1.15 ** i, 2.0 - 0.01 * i) for i in range(40)]
    flat = [_row(up[-1]["kl/prcp"], 1.6)] * 40
    again = [_row(up[-1]["kl/prcp"] * 1.15 ** i, 1.6 - 0.01 * i) for i in range(40)]
    ws = replay(up + flat + again)
    assert [w.signature for w in ws] == ["kl_runaway", "kl_runaway"] and ws[1].step > 80
    with pytest.raises(ValueError, match="runaway_growth > 1"):
        CollapseDetector(runaway_growth=1.0)


DATA = Path(__file__).resolve().parents[1] / "data" / "collapse"


def test_replay_recorded_traces():
    """Traces of real runs (tests/data/collapse, trimmed by collapse.trim; shortcut task from the shared GRPO warm
    start, 100 steps, seed 2; commands in the README's PAPO-vs-GRPO section): the PAPO run (gamma 0.005, the
    tiny_cpu recipe) whose KL_prcp grows ~30x while entropy falls warns with the runaway signature; the GRPO run
    (no KL_prcp logged) is silent. The gamma=1e-9 run (GRPO's dynamics, KL_prcp measured) warns too: on this task
    the growth comes with the policy sharpening, which the warning message tells the user how to check."""
    papo = read_metrics(DATA / "shortcut_papo_g0.005_s2.jsonl")
    kl = [r["kl/prcp"] for r in papo]
    assert len(papo) == 100 and np.mean(kl[-10:]) > 20 * np.mean(kl[:10])
    assert np.mean([r["entropy/ori"] for r in papo[-10:]]) < np.mean([r["entropy/ori"] for r in papo[:10]]) - 1
    ws = replay(papo)
    assert [w.signature for w in ws] == ["kl_runaway"] and ws[0].metric == "kl/prcp" and "kl_prcp_clip" in ws[0].knob
    assert 40 <= ws[0].step <= 100 and "kl_prcp_coef=1e-9" in ws[0].message
    grpo = read_metrics(DATA / "shortcut_grpo_s2.jsonl")
    assert len(grpo) == 100 and replay(grpo) == []
    monitored = replay(read_metrics(DATA / "shortcut_grpo_monitor_s2.jsonl"))
    assert monitored and {w.signature for w in monitored} == {"kl_runaway"}
