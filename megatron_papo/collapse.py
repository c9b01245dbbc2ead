"""Early warnings of PAPO's perception-KL collapse, from the per-step training metrics.

Two signatures, each a :class:`CollapseWarning` naming the metric that tripped it and the knob to turn:

- ``kl_jump`` (the paper's, papo_spec §9): ``kl/prcp`` jumps above ``jump`` x the mean of the previous
  ``jump_window`` steps while both entropies (``entropy/ori``, ``entropy/aug``) and the clip-high fraction
  (``clipfrac/high``) rise above their means. The paper counters it with the entropy loss and a lower gamma.
- ``kl_runaway`` (what the tiny CPU runs show): ``kl/prcp`` grows for many steps while ``entropy/ori`` falls.
  The mean KL_prcp of the last ``runaway_window`` steps is at least ``runaway_growth`` x the mean of the same-size
  window ``runaway_lag`` steps earlier and at least ``runaway_min_kl`` nats/token, and the entropy's mean fell
  between the two windows, on ``runaway_patience`` consecutive steps. Entropy terms do not help here (they
  minimise entropy, which is already falling): lower gamma, cap the per-token KL (``algo.kl_prcp_clip``) or
  anneal gamma. Caveat, measured on the shortcut task (README): a run with ``algo.kl_prcp_coef=1e-9`` (GRPO's
  dynamics, KL_prcp measured but not optimised) shows the same growth and trips this warning too, so there the
  growth comes with the policy sharpening, not from the PAPO term; the warning says how to check that.

A signature warns once when it first holds and re-arms after it has been clear for a whole window.
Runs without PAPO log no ``kl/prcp``; both signatures stay silent there. :func:`replay` runs the detector over
recorded ``metrics.jsonl`` rows (``tools/bench/learning.py`` and ``tests/unit/test_collapse.py`` use it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

KEYS = ("kl/prcp", "entropy/ori", "entropy/aug", "clipfrac/high")


@dataclass(frozen=True)
class CollapseWarning:
    """One warning: which signature, at which step, the metric that tripped it and the config knob to turn."""

    step: int
    signature: str
    metric: str
    knob: str
    message: str

    def __str__(self) -> str:
        return f"{self.signature}: {self.message}; tripped by {self.metric}; turn {self.knob}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


class CollapseDetector:
    """Feed it every step's metrics (:meth:`update`); it returns the warnings that fire at that step."""

    def __init__(self, *, jump_window: int = 10, jump: float = 3.0, runaway_window: int = 10, runaway_lag: int = 30,
                 runaway_growth: float = 3.0, runaway_min_kl: float = 0.3, runaway_patience: int = 5) -> None:
        if (jump_window < 3 or runaway_window < 2 or runaway_lag < runaway_window or runaway_patience < 1 or jump <= 1
                or runaway_growth <= 1):
            raise ValueError("CollapseDetector: need jump_window >= 3, runaway_window >= 2, runaway_lag >= runaway_window, "
                             "runaway_patience >= 1, jump > 1 and runaway_growth > 1")
        self.jump_window, self.jump = jump_window, jump
        self.runaway_window, self.runaway_lag, self.runaway_growth = runaway_window, runaway_lag, runaway_growth
        self.runaway_min_kl, self.runaway_patience = runaway_min_kl, runaway_patience
        self.hist: list[dict[str, float]] = []
        self._streak = {"kl_jump": 0, "kl_runaway": 0}
        self._clear = {"kl_jump": 0, "kl_runaway": 0}
        self._armed = {"kl_jump": True, "kl_runaway": True}
        self._step = 0

    def update(self, metrics: Mapping[str, float], step: Optional[int] = None) -> list[CollapseWarning]:
        """This step's warnings (usually none). ``step`` defaults to the number of updates so far."""
        self._step = int(step) if step is not None else self._step + 1
        if "kl/prcp" not in metrics or not _finite(metrics["kl/prcp"]):
            return []  # no PAPO term measured (GRPO/DAPO) or a skipped step
        cur = {k: float(metrics.get(k, 0.0)) for k in KEYS}
        out = []
        for name, hit in (("kl_jump", self._jump(cur)), ("kl_runaway", self._runaway(cur))):
            warning = self._debounce(name, hit)
            if warning is not None:
                out.append(warning)
        self.hist = (self.hist + [cur])[-max(self.jump_window, self.runaway_lag + self.runaway_window):]
        return out

    def _debounce(self, name: str, hit: Optional[CollapseWarning]) -> Optional[CollapseWarning]:
        need = 1 if name == "kl_jump" else self.runaway_patience
        if hit is None:
            self._streak[name] = 0
            self._clear[name] += 1
            if self._clear[name] >= self.runaway_window:
                self._armed[name] = True
            return None
        self._clear[name] = 0
        self._streak[name] += 1
        if self._armed[name] and self._streak[name] >= need:
            self._armed[name] = False
            return hit
        return None

    def _jump(self, cur: dict[str, float]) -> Optional[CollapseWarning]:
        hist = self.hist[-self.jump_window:]
        if len(hist) < 3:
            return None
        base = {k: _mean([h[k] for h in hist]) for k in KEYS}
        if not (base["kl/prcp"] > 0 and cur["kl/prcp"] > self.jump * base["kl/prcp"]
                and all(cur[k] > base[k] for k in ("entropy/ori", "entropy/aug", "clipfrac/high"))):
            return None
        return CollapseWarning(
            self._step, "kl_jump", "kl/prcp",
            "algo.ori_entropy_coef/aug_entropy_coef (entropy loss, the paper uses 0.05) or a lower algo.kl_prcp_coef",
            f"kl/prcp {cur['kl/prcp']:.3g} is {cur['kl/prcp'] / base['kl/prcp']:.1f}x its mean {base['kl/prcp']:.3g} of the "
            f"last {len(hist)} steps while entropy/ori, entropy/aug and clipfrac/high rise (KL_prcp hacking, papo_spec §9)")

    def _runaway(self, cur: dict[str, float]) -> Optional[CollapseWarning]:
        w, lag = self.runaway_window, self.runaway_lag
        series = self.hist[-(lag + w - 1):] + [cur]
        if len(series) < lag + w:
            return None
        old, new = series[:w], series[-w:]
        kl_old, kl_new = _mean([h["kl/prcp"] for h in old]), _mean([h["kl/prcp"] for h in new])
        h_old, h_new = _mean([h["entropy/ori"] for h in old]), _mean([h["entropy/ori"] for h in new])
        if not (kl_new >= self.runaway_min_kl and kl_new >= self.runaway_growth * max(kl_old, 1e-12) and h_new < h_old):
            return None
        return CollapseWarning(
            self._step, "kl_runaway", "kl/prcp",
            "a lower algo.kl_prcp_coef, algo.kl_prcp_clip (cap per-token KL_prcp) or algo.kl_prcp_schedule=annealing "
            "(not the entropy terms: entropy is already falling)",
            f"kl/prcp mean {kl_new:.3g} over the last {w} steps is {kl_new / max(kl_old, 1e-12):.1f}x its {kl_old:.3g} "
            f"{lag} steps earlier while entropy/ori fell {h_old:.3g} -> {h_new:.3g} (a rerun with algo.kl_prcp_coef=1e-9 "
            "measures KL_prcp without optimising it: if it grows there too, the policy's sharpening drives it, not PAPO)")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def read_metrics(path: Union[str, Path]) -> list[dict]:
    """The training rows of a ``metrics.jsonl`` (rows with ``step``; eval rows are dropped), in step order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "step" in r and not any(k.startswith("eval/") for k in r)]
    return sorted(train, key=lambda r: r["step"])


def trim(rows: Iterable[Mapping[str, float]], digits: int = 5) -> list[dict]:
    """Rows cut to what :func:`replay` reads (``step`` and :data:`KEYS`, plus ``reward/accuracy`` for the reader),
    values rounded to ``digits`` significant digits: a small trace to check in (tests/data/)."""
    keep = ("step", *KEYS, "reward/accuracy")
    return [{k: (float(f"{r[k]:.{digits}g}") if k != "step" else int(r[k])) for k in keep if k in r} for r in rows]


def replay(rows: Iterable[Mapping[str, float]], **kwargs: float) -> list[CollapseWarning]:
    """Run a fresh detector over recorded per-step metric rows (``step`` key optional); all warnings."""
    det = CollapseDetector(**kwargs)
    out: list[CollapseWarning] = []
    for i, r in enumerate(rows):
        out.extend(det.update(r, step=int(r.get("step", i + 1))))
    return out
