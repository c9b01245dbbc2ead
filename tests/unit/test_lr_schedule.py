"""LR schedule (optim.lr_warmup_steps / lr_warmup_ratio / lr_decay / min_lr) through megatron-core's
OptimizerParamScheduler: the lr of each training step against the closed-form schedule in float64, and an exact
continuation from a JSON round trip of its state (what the checkpoint's trainer_state holds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_papo.config import ConfigError, load_config
from megatron_papo.config.optim import lr_schedule_steps
from megatron_papo.parallel.training import build_lr_scheduler, current_lr


def _optimizer() -> torch.optim.Optimizer:
    # mcore's param groups: default_config, max_lr = lr, min_lr unset (None) unless OptimizerConfig.min_lr is given
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [p], "default_config": True, "max_lr": 1.0, "min_lr": None, "wd_mult": 1.0}],
                             lr=123.0)


def expected_lr(s: int, lr: float, min_lr: float, warmup: int, decay: int, style: str) -> float:
    """Training step s (1-based) in float64: linear warmup lr*s/warmup, then constant / linear / cosine to min_lr."""
    if warmup and s <= warmup:
        return lr * s / warmup
    if style == "constant":
        return lr
    if s >= decay:
        return min_lr
    t = (s - warmup) / (decay - warmup)
    coeff = 1 - t if style == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.parametrize("style,warmup,decay", [("cosine", 3, 10), ("linear", 0, 8), ("constant", 4, 20),
                                                ("cosine", 0, 5)])
def test_lr_per_step_matches_closed_form(style, warmup, decay):
    lr, min_lr = 3e-4, 3e-5
    opt = _optimizer()
    sched = build_lr_scheduler(opt, lr=lr, min_lr=min_lr, warmup_steps=warmup, decay_steps=decay, decay_style=style,
                               weight_decay=0.01)
    got = []
    for _ in range(decay + 3):
        sched.step(1)
        got.append(current_lr(opt))
        assert opt.param_groups[0]["weight_decay"] == 0.01
    want = [expected_lr(s, lr, min_lr, warmup, decay, style) for s in range(1, decay + 4)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    if warmup:
        assert got[warmup - 1] == pytest.approx(lr) and got[0] == pytest.approx(lr / warmup)


def test_state_round_trip_continues_exactly():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_steps=2, decay_steps=9, decay_style="cosine", weight_decay=0.0)
    a_opt = _optimizer()
    a = build_lr_scheduler(a_opt, **kw)
    full = []
    for _ in range(9):
        a.step(1)
        full.append(current_lr(a_opt))
    b_opt = _optimizer()
    b = build_lr_scheduler(b_opt, **kw)
    for _ in range(4):
        b.step(1)
    state = json.loads(json.dumps(b.state_dict()))  # as saved in trainer_state.json
    b_opt.param_groups[0].update(max_lr=7.0, min_lr=None)  # a checkpoint's groups may carry other values
    c_opt = _optimizer()
    c = build_lr_scheduler(c_opt, **kw)
    c.load_state_dict(state)
    assert current_lr(c_opt) == full[3]
    resumed = []
    for _ in range(5):
        c.step(1)
        resumed.append(current_lr(c_opt))
    assert resumed == full[4:]  # bit for bit


def test_config_resolution_and_errors():
    o = load_config(None, ["total_steps=200", "optim.lr_warmup_ratio=0.05", "optim.lr_decay=cosine"]).optim
    assert lr_schedule_steps(o, 200) == (10, 200)
    o = load_config(None, ["optim.lr_warmup_steps=7", "optim.lr_decay_steps=50", "optim.lr_decay=linear"]).optim
    assert lr_schedule_steps(o, 202) == (7, 50)
    assert lr_schedule_steps(load_config(None, ["total_steps=3", "optim.lr_warmup_steps=5"]).optim, 3) == (5, 6)
    for bad, msg in (("optim.lr_warmup_ratio=1.5", "must be in [0, 1)"),
                     ("optim.min_lr=1", "must be in [0, optim.lr="),
                     ("optim.lr_decay=step", "expected one of ['constant', 'linear', 'cosine']")):
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="lr_warmup_steps and optim.lr_warmup_ratio are both set"):
        load_config(None, ["optim.lr_warmup_steps=2", "optim.lr_warmup_ratio=0.1"])
    with pytest.raises(ConfigError, match=r"warmup \(300 steps\) must end before the cosine decay"):
        load_config(None, ["optim.lr_warmup_steps=300", "optim.lr_decay=cosine"])
