"""weight_sync (plan → gather → map → push) on torchrun gloo ranks, checked against the HF checkpoint files.

The mcore model is loaded from a perturbed HF checkpoint written by transformers' ``save_pretrained``;
the buckets that stage 0 receives must reproduce those safetensors exactly (the independent
reference), at TP=2 (one all-gather per bucket) and PP=2 (bucket broadcast from the last stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.harness import run_distributed

pytestmark = [pytest.mark.distributed]


def check_buckets(hf_dir: str, tp: int, pp: int, bucket_bytes: int) -> dict[str, Any]:
    """Worker: iterate the HF buckets of an mcore model loaded from ``hf_dir``; compare with its files."""
    from safetensors.torch import load_file

    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore
    from megatron_papo.models.qwen2_5_vl.hf_adapter import export_plan
    from megatron_papo.parallel import init_distributed
    from megatron_papo.rollout.weight_sync import SyncState, iter_hf_buckets, plan_buckets

    pg = init_distributed(ParallelConfig(tp=tp, pp=pp, device="cpu"))
    model = build_model(None, pg, hf_dir=hf_dir)
    load_hf_into_mcore([model], hf_dir)
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        ref.update(load_file(str(f)))
    got: dict[str, torch.Tensor] = {}
    sizes, dtypes = [], set()
    stats: dict[str, float] = {}
    for bucket in iter_hf_buckets([model], bucket_bytes, stats=stats):
        sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        dtypes |= {str(t.dtype) for _, t in bucket}
        got.update({n: t.clone() for n, t in bucket})
    plan = plan_buckets(export_plan([model]), torch.float32, bucket_bytes)
    out: dict[str, Any] = {"pp_rank": pg.pp_rank, "n": len(got), "buckets": len(sizes), "dtypes": sorted(dtypes),
                           "plan_ok": all(b.nbytes <= bucket_bytes or len(b.specs) == 1 for b in plan),
                           "multi_param_buckets": sum(len(b.specs) > 1 for b in plan),
                           "planned_sizes": [b.nbytes for b in plan], "sizes": sizes}
    if pg.pp_rank == 0:
        out["missing"] = sorted(set(ref) - set(got))
        out["extra"] = sorted(set(got) - set(ref))
        out["different"] = sorted(n for n in set(ref) & set(got) if not torch.equal(got[n], ref[n]))
    for name, p in model.named_parameters():  # freeze the vision tower: pushed once, then skipped
        if name.startswith("vision"):
            p.requires_grad_(False)
    state = SyncState()
    first = [n for b in iter_hf_buckets([model], bucket_bytes, state=state) for n, _ in b]
    st2: dict[str, float] = {}
    second = [n for b in iter_hf_buckets([model], bucket_bytes, state=state, stats=st2) for n, _ in b]
    out["first_sync_has_visual"] = any(n.startswith("visual.") for n in first)
    out["second_sync_has_visual"] = any(n.startswith("visual.") for n in second)
    out["second_sync_n"] = len(second)
    out["skipped_params"] = st2["skipped_params"]
    return out


@pytest.fixture(scope="module")
def perturbed_dir(tiny_model_dir, tmp_path_factory):
    from tests.integration.sglang_reference import perturbed_checkpoint

    out = tmp_path_factory.mktemp("perturbed") / "model"
    perturbed_checkpoint(tiny_model_dir, out, seed=5)
    return str(out)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_buckets_reproduce_checkpoint(perturbed_dir, tp, pp):
    bucket_bytes = 256 << 10
    res = run_distributed("tests.integration.test_sglang_weight_sync:check_buckets", nproc=tp * pp,
                          kwargs={"hf_dir": perturbed_dir, "tp": tp, "pp": pp, "bucket_bytes": bucket_bytes}, timeout=600)
    for r in res:
        assert r["dtypes"] == ["torch.float32"] or r["n"] == 0
        if r["pp_rank"] == 0:
            assert r["missing"] == [] and r["extra"] == [], r
            assert r["different"] == [], f"tensors differ from the checkpoint: {r['different']}"
            assert r["buckets"] > 3
            assert r["plan_ok"] and r["multi_param_buckets"] > 0  # over-size buckets hold one parameter
            if pp == 1:
                assert r["sizes"] == r["planned_sizes"]
            assert r["first_sync_has_visual"] and not r["second_sync_has_visual"]
            assert r["skipped_params"] > 0 and r["second_sync_n"] > 0
        else:
            assert r["n"] == 0  # later stages only take part in the collectives
