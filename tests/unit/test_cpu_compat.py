"""Each patch of the Megatron-Core CPU compatibility layer: what fails without it, and that it fixes it.

Every case runs in a fresh interpreter so a patch applied in one case cannot leak into another.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is only for CUDA-less machines")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


RNG = """
from megatron_papo.parallel.cpu import apply_cpu_compat
{apply}
import torch
from megatron.core import tensor_parallel
tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
tr = tensor_parallel.get_cuda_rng_tracker()
with tr.fork():
    a = torch.rand(3)
with tr.fork():
    b = torch.rand(3)
torch.manual_seed(0); c = torch.rand(1)
assert not torch.equal(a, b)  # the named stream advances
print("OK", a.tolist())
"""

DEVICE = """
from megatron_papo.parallel.cpu import apply_cpu_compat
{apply}
import torch
x = torch.zeros(2, device="cuda")
y = torch.ones(2).cuda()
z = torch.ones(2).to("cuda")
d = torch.cuda.current_device()
torch.cuda.synchronize()
w = torch.empty(1, device=torch.cuda.current_device())
assert x.device.type == y.device.type == z.device.type == w.device.type == "cpu"
assert torch.ones(1).type() == "torch.cuda.FloatTensor"
print("OK")
"""

SP_NORM = """
from megatron_papo.parallel.cpu import apply_cpu_compat
{apply}
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.torch_norm import WrappedTorchNorm
cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
                        sequence_parallel=True, normalization="RMSNorm", use_cpu_initialization=True)
n = WrappedTorchNorm(cfg, 8)
assert all(getattr(p, "sequence_parallel", False) for p in n.parameters())
print("OK")
"""


RECOMPUTE = """
from megatron_papo.parallel.cpu import apply_cpu_compat
{apply}
import torch
from megatron.core.tensor_parallel import random as mrandom
state = mrandom._get_cuda_rng_state()
a = torch.rand(2)
mrandom._set_cuda_rng_state(state)
assert torch.equal(a, torch.rand(2))
print("OK")
"""


@pytest.mark.parametrize("name, code, only, failure", [
    ("recompute_rng", RECOMPUTE, ("recompute_rng",), ""),
    ("rng_tracker", RNG, ("rng_tracker",), ""),
    ("device_mode+current_device+synchronize", DEVICE, ("device_mode", "current_device", "synchronize"), ""),
    ("sp_torch_norm", SP_NORM, ("sp_torch_norm",), "sequence parallel not supported by torch"),
])
def test_patch_fixes_what_breaks(name, code, only, failure):
    without = _run(code.format(apply=""))
    assert without.returncode != 0, f"{name}: expected a failure without the patch"
    if failure:
        assert failure in without.stderr
    with_patch = _run(code.format(apply=f"apply_cpu_compat(only={only!r})"))
    assert with_patch.returncode == 0 and "OK" in with_patch.stdout, with_patch.stderr[-3000:]


def test_rng_tracker_is_deterministic():
    a = _run(RNG.format(apply="apply_cpu_compat(only=('rng_tracker',))")).stdout
    b = _run(RNG.format(apply="apply_cpu_compat(only=('rng_tracker',))")).stdout
    assert a == b and a.startswith("OK")
