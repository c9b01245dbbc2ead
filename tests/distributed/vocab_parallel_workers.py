"""Cases, float64 reference and torchrun workers for the vocab-parallel ``token_stats`` tests.

Every case is generated from a seed, so the pytest process and every rank build the same full
logits; each rank slices its vocab shard, runs ``token_stats`` + backward and returns its outputs
and gradient shard as JSON lists. The pytest process glues the shards back together and compares
them with :func:`reference`, plain float64 ``log_softmax``/``softmax`` with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_papo.ops.vocab_parallel import IGNORE_INDEX, token_stats

V = 48  # divisible by 1, 2 and 4
OUTPUTS = ("logprob", "ref_logprob", "entropy", "ref_entropy", "kl")


@dataclass(frozen=True)
class Case:
    """One test case: ``data`` names the seeded inputs (cases sharing it see identical tensors)."""

    data: str
    lead: tuple[int, ...]
    temperature: float = 1.0
    outputs: tuple[str, ...] = OUTPUTS
    ref_grad: bool = True
    chunk: Optional[int] = None
    dtype: torch.dtype = torch.float32


CASES: dict[str, Case] = {
    "bs": Case("bs", (3, 5), 0.7),
    "bs_chunk4": Case("bs", (3, 5), 0.7, chunk=4),
    "extreme": Case("extreme", (20,), 1.3),
    "extreme_chunk7": Case("extreme", (20,), 1.3, chunk=7),
    "extreme_detached": Case("extreme", (20,), 1.0, ref_grad=False),
    "papo_published": Case("bs", (15,), 1.0, outputs=("logprob", "ref_logprob", "kl"), ref_grad=False, chunk=6),
    "logprob_only": Case("bs", (3, 5), 1.0, outputs=("logprob",), ref_grad=False, chunk=5),
    "logprob_entropy": Case("extreme", (20,), 0.5, outputs=("logprob", "entropy"), ref_grad=False),
    "bf16_extreme": Case("extreme", (20,), 0.9, dtype=torch.bfloat16),
}
CHUNK_PAIRS = [("bs", "bs_chunk4"), ("extreme", "extreme_chunk7")]


def make_case(name: str, seed: int = 0) -> dict[str, Any]:
    """Full-vocabulary inputs of a case: logits, ref_logits ``[..., V]``, labels, upstream weights, options."""
    case = CASES[name]
    lead = case.lead
    g = torch.Generator().manual_seed(seed + sum(map(ord, case.data)))
    n = 1
    for d in lead:
        n *= d
    x = torch.randn(n, V, generator=g) * 3
    xr = x + torch.randn(n, V, generator=g)  # the masked view: correlated with the original
    if case.data == "extreme":
        x[0::4, 5] = 1e4  # near one-hot at a huge logit
        x[1::4] = torch.where(torch.rand(x[1::4].shape, generator=g) < 0.3, -1e4, x[1::4])
        x[2::4, V - 1] = -1e4
        x[2::4, 17] = 1e4
        x[3::4] = x[3::4] * 0 + torch.randn(V, generator=g) * 1e-3  # nearly uniform
        x[3::4, 30] = 25.0  # near one-hot at a moderate logit
        xr[0::4, 5] = -1e4  # the masked view disagrees completely on some tokens
        xr[2::4] = x[2::4] + 1e-3 * torch.randn(xr[2::4].shape, generator=g)
        x[5, 2] = x[5, 40] = 50.0  # a tie for the max across shards
        x[9, 2] = x[9, 3] = 50.0  # a tie inside one shard
    labels = torch.randint(0, V, (n,), generator=g)
    labels[:8] = torch.tensor([5, 13, 25, 37, 47, 0, 12, 36])  # labels on every shard of TP=2 and TP=4
    labels[3] = IGNORE_INDEX
    labels[n - 2] = IGNORE_INDEX
    weights = torch.randn(len(OUTPUTS), n, generator=g)
    return {
        "x": x.to(case.dtype).reshape(*lead, V), "xr": xr.to(case.dtype).reshape(*lead, V),
        "labels": labels.reshape(lead), "weights": weights.reshape(len(OUTPUTS), *lead),
        "temperature": case.temperature, "ref_grad": case.ref_grad, "chunk": case.chunk, "outputs": case.outputs,
    }


def reference(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Float64 single-process outputs and gradients (plain log_softmax/softmax + autograd)."""
    x = case["x"].double().requires_grad_(True)
    xr = case["xr"].double().requires_grad_(case["ref_grad"])
    labels = case["labels"]
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0).unsqueeze(-1)
    logp = torch.log_softmax(x / case["temperature"], -1)
    logq = torch.log_softmax(xr / case["temperature"], -1)
    p, q = logp.exp(), logq.exp()
    out = {
        "logprob": logp.gather(-1, safe).squeeze(-1),
        "ref_logprob": logq.gather(-1, safe).squeeze(-1),
        "entropy": -(p * logp).sum(-1),
        "ref_entropy": -(q * logq).sum(-1),
        "kl": (p * (logp - logq)).sum(-1),
    }
    out = {k: torch.where(valid, v, 0.0) for k, v in out.items()}
    loss = sum((case["weights"][i].double() * out[k]).sum() for i, k in enumerate(OUTPUTS) if k in case["outputs"])
    loss.backward()
    res = {k: v.detach() for k, v in out.items() if k in case["outputs"]}
    res["grad_x"] = x.grad
    res["grad_xr"] = xr.grad if case["ref_grad"] else None
    return res


def run_local(case: dict[str, Any], group: Optional[dist.ProcessGroup], rank: int, size: int) -> dict[str, Any]:
    """This rank's ``token_stats`` outputs and gradient shards for one case (tensors, not lists)."""
    v_local = V // size
    sl = slice(rank * v_local, (rank + 1) * v_local)
    x_full, xr_full = case["x"], case["xr"]
    want = case["outputs"]
    has_ref = any(k.startswith("ref_") or k == "kl" for k in want)
    x = x_full[..., sl].clone().requires_grad_(True)
    xr = xr_full[..., sl].clone().requires_grad_(True) if has_ref else None
    x_before = x.detach().clone()
    xr_before = xr.detach().clone() if has_ref else None
    st = token_stats(x, case["labels"], group, ref_logits=xr, temperature=case["temperature"],
                     entropy="entropy" in want, ref_entropy="ref_entropy" in want, kl="kl" in want,
                     ref_requires_grad=case["ref_grad"], chunk_size=case["chunk"])
    outs = {k: getattr(st, k) for k in OUTPUTS}
    loss = sum((case["weights"][i] * outs[k]).sum() for i, k in enumerate(OUTPUTS) if k in want)
    loss.backward()
    return {
        **{k: v.detach() for k, v in outs.items() if v is not None},
        "returned": sorted(k for k, v in outs.items() if v is not None),
        "dtypes": sorted({str(v.dtype) for v in outs.values() if v is not None}),
        "ref_out_requires_grad": any(v is not None and v.requires_grad for k, v in outs.items() if k.startswith("ref_")),
        "grad_x": x.grad, "grad_xr": xr.grad if has_ref else None,
        "inputs_unchanged": bool(torch.equal(x.detach(), x_before) and (not has_ref or torch.equal(xr.detach(), xr_before))),
    }


def _jsonable(res: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.float().tolist() if isinstance(v, torch.Tensor) else v) for k, v in res.items()}


def check_tp(cases: list[str], tps: list[int], seed: int = 0) -> dict[str, Any]:
    """Worker: for every TP size in ``tps`` build explicit groups, run every case; returns nested JSON results.

    Result: ``{str(tp): {"group_rank": r, "group_ranks": [...], "cases": {name: run_local(...)}}}``.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    out: dict[str, Any] = {}
    for tp in tps:
        group, members = None, [rank]
        for start in range(0, world, tp):  # every rank must create every group, in the same order
            ranks = list(range(start, start + tp))
            g = dist.new_group(ranks) if tp != world else dist.group.WORLD
            if rank in ranks:
                group, members = g, ranks
        if tp == 1 and rank % 2 == 1:
            group = None  # also exercise group=None
        r = members.index(rank)
        out[str(tp)] = {"group_rank": r, "group_ranks": members,
                        "cases": {c: _jsonable(run_local(make_case(c, seed), group, r, tp)) for c in cases}}
    return out


def assemble(per_rank: list[dict[str, Any]], tp: int, name: str) -> list[dict[str, torch.Tensor]]:
    """For each TP group in a ``check_tp`` result: outputs of group rank 0 and gradients glued from the shards."""
    groups: dict[tuple[int, ...], dict[int, dict]] = {}
    for res in per_rank:
        entry = res[str(tp)]
        groups.setdefault(tuple(entry["group_ranks"]), {})[entry["group_rank"]] = entry["cases"][name]
    glued = []
    for shards in groups.values():
        first = shards[0]
        out = {k: torch.tensor(first[k], dtype=torch.float64) for k in first["returned"]}
        for k in ("grad_x", "grad_xr"):
            out[k] = None if first[k] is None else torch.cat(
                [torch.tensor(shards[r][k], dtype=torch.float64) for r in range(tp)], -1)
        out["meta"] = {r: {k: v for k, v in shards[r].items() if k not in (*OUTPUTS, "grad_x", "grad_xr")}
                       for r in range(tp)}
        out["outputs_by_rank"] = [{k: torch.tensor(shards[r][k], dtype=torch.float64) for k in first["returned"]}
                                  for r in range(tp)]
        glued.append(out)
    return glued


def error_ratios(name: str, got: dict[str, Any], bf16_tol: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """Max of ``|got - ref| / tol`` per output and gradient (``<= 1`` passes) against the float64 reference.

    Tolerances (fp32 inputs, ``r = 1e-6``; bf16 inputs use ``r = bf16_tol``):
      * logprob, ref_logprob, entropy, ref_entropy: ``r * |ref| + 0.1 * r`` — relative, with a 1e-7 floor
        (the floor only matters for values below 0.1; entropies of near one-hot rows are 4e-6 here).
      * kl: ``r * (|ref| + 1)`` — KL is ``E_p[u - u'] - log S + log S'``, a difference of O(1)-nat terms,
        so its fp32 error is absolute (~eps * log V) when the two views nearly agree.
      * gradients (both inputs): ``r * (|ref| + s)`` with the row scale ``s = |w_lp| + |w_rlp| +
        |w_H| (1 + H) + |w_H'| (1 + H') + |w_kl| (1 + KL + H)``, ``w`` the random upstream weights: the
        gradient of an output of size ``O`` carries fp32 error ~ eps * O (e.g. dKL/dz at a one-hot row
        whose KL is 1e4 is a difference of 1e4-sized terms).
    """
    case = make_case(name, seed)
    ref = reference(case)
    r = bf16_tol if case["x"].dtype == torch.bfloat16 else 1e-6
    ratios = {}
    for k in case["outputs"]:
        tol = r * (ref[k].abs() + 1) if k == "kl" else r * ref[k].abs() + 0.1 * r
        ratios[k] = float(((got[k] - ref[k]).abs() / tol).max())
    w = case["weights"].double().abs() * torch.tensor([k in case["outputs"] for k in OUTPUTS], dtype=torch.float64
                                                      ).view(-1, *[1] * (case["weights"].dim() - 1))
    o = {k: (ref[k].abs() if k in ref else torch.zeros_like(w[0])) for k in OUTPUTS}
    scale = (w[0] + w[1] + w[2] * (1 + o["entropy"]) + w[3] * (1 + o["ref_entropy"])
             + w[4] * (1 + o["kl"] + o["entropy"])).unsqueeze(-1)
    for k in ("grad_x", "grad_xr"):
        if ref[k] is None:
            continue
        ratios[k] = float(((got[k] - ref[k]).abs() / (r * (ref[k].abs() + scale))).max())
    return ratios
