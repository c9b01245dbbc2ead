"""The sgl_kernel CPU stand-in: active only with SGLANG_USE_CPU_ENGINE=1, answers *_cpu names, raises on call."""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_papo.rollout.cpu_shim import SHIM_DIR

PROBE = r"""
import sys, torch
sys.path.insert(0, {shim!r})
import sgl_kernel
assert sgl_kernel.IS_MEGATRON_PAPO_CPU_SHIM
try:
    sgl_kernel.rmsnorm
    raise SystemExit("non-_cpu name answered")
except AttributeError:
    pass
for fn in (sgl_kernel.rmsnorm_cpu, torch.ops.sgl_kernel.fused_sigmoid_mul_cpu):
    try:
        fn(torch.zeros(2))
        raise SystemExit("op did not raise")
    except NotImplementedError as e:
        assert "CPU shim" in str(e)
assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")  # keeps SGLang off its AMX path
print("ok")
"""


def test_stand_in_answers_cpu_names_and_raises():
    r = subprocess.run([sys.executable, "-c", PROBE.format(shim=SHIM_DIR)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    assert "was called" in r.stderr  # every call is logged


def test_pth_rule_applies_only_with_the_variable():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launch"))
    try:
        from install_sglang_cpu_shim import pth_line
    finally:
        sys.path.pop(0)
    line = pth_line(SHIM_DIR)
    code = f"{line.strip()}\nimport sys; print({SHIM_DIR!r} in sys.path)"
    for value, expect in (("1", "True"), ("0", "False")):
        env = {**os.environ, "SGLANG_USE_CPU_ENGINE": value}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert r.stdout.strip().splitlines()[-1] == expect, r.stderr
