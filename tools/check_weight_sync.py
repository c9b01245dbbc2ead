"""After a weight sync from an mcore actor at any TP/PP/DP, compare every engine's log-probs with the actor's.

    torchrun --nproc-per-node 2 tools/check_weight_sync.py --tp 2 [--pp 1] [--hf DIR] [--transport tensor]
    python tools/check_weight_sync.py                       # TP=1, a tiny model built offline
    python tools/check_weight_sync.py --separate 2 --transport distributed   # 2 servers behind sglang-router

The engines form a rollout fleet (``rollout/fleet.py``): colocated, one per ``--engine-tp`` ranks (so a
2-process run checks 2 engines); ``--separate N``: N ``sglang.launch_server`` engines driven by rank 0
behind sglang-router, fed through one weight-update group. Every engine decodes the whole batch.

The engine starts from ``--hf`` (default: a tiny checkpoint built offline); the actor is loaded from a
*perturbed* copy of it (seeded noise, ``--perturb``), so the engine only answers correctly if the
sync worked. After ``weight_sync.sync_weights`` the engine decodes a fixed multimodal batch greedily
(``--max-new-tokens``); the actor scores the same tokens teacher-forced (vocab-parallel, under
mcore's schedule, with the same banned ids at -inf). Prints one JSON line
``{"max_abs_logprob_diff", "tp", "pp", "engine", "transport", "tokens", "sync_seconds", ...}`` and exits
1 above ``--atol``. ``--check-transformers`` also decodes with transformers holding the perturbed
weights and requires identical greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="check_weight_sync", description=__doc__.splitlines()[0])
    p.add_argument("--hf", default=None, help="HF Qwen2.5-VL directory the engine starts from (default: tiny, offline)")
    p.add_argument("--tp", type=int, default=1, help="actor tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="actor pipeline-parallel size")
    p.add_argument("--engine", choices=["sglang"], default="sglang", help="rollout engine")
    p.add_argument("--transport", choices=["tensor", "distributed", "disk"], default="tensor", help="weight transport")
    p.add_argument("--bucket-mb", type=int, default=512, help="weight-sync bucket size (MiB)")
    p.add_argument("--perturb", type=float, default=0.05, help="std of the noise added to the actor's weights")
    p.add_argument("--max-new-tokens", type=int, default=12, help="greedy tokens per prompt")
    p.add_argument("--atol", type=float, default=1e-5, help="max allowed |logp_engine - logp_actor|")
    p.add_argument("--check-transformers", action="store_true", help="also require greedy tokens == transformers'")
    p.add_argument("--engine-tp", type=int, default=1, help="colocated: ranks per engine (world/engine_tp engines)")
    p.add_argument("--separate", type=int, default=0, help="N > 0: N separate SGLang servers (rank 0) behind sglang-router")
    p.add_argument("--out", default=None, help="also write the JSON line to this file")
    return p


def perturb_checkpoint(src: str, dst: str, scale: float, seed: int = 1234) -> None:
    """Write a copy of ``src`` whose every weight carries seeded Gaussian noise (transformers save_pretrained)."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(dst)
    AutoProcessor.from_pretrained(src).save_pretrained(dst)


def prompts(processor: Any) -> list[tuple[dict, list]]:
    """The fixed batch: (processor encoding of one prompt, its images) for each built-in sample."""
    from megatron_papo.models.qwen2_5_vl import parity

    out = []
    for s in parity.builtin_samples():
        text = processor.apply_chat_template([{"role": "user", "content": s["content"]}], add_generation_prompt=True)
        out.append((dict(processor(text=[text], images=s["images"] or None, return_tensors="pt")), s["images"]))
    return out


def actor_logprobs(model: Any, pg: Any, enc: dict, response: list[int], banned: list[int]) -> Optional[list[float]]:
    """Teacher-forced log-probs of ``response`` from the mcore actor (last stage; None elsewhere)."""
    import torch

    from megatron_papo.models.qwen2_5_vl.build import make_forward_step
    from megatron_papo.models.qwen2_5_vl.parity import vocab_parallel_logprobs
    from megatron_papo.parallel.training import forward_backward

    ids = torch.cat([enc["input_ids"], torch.tensor([response])], 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch.update({k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc})
    out: dict[str, Any] = {}

    def loss_fn(b: dict, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        v_local = logits.shape[-1]
        lo = pg.tp_rank * v_local
        local = [i - lo for i in banned if lo <= i < lo + v_local]
        logits = logits.float().clone()
        logits[..., local] = float("-inf")
        out["lp"] = vocab_parallel_logprobs(logits, b["input_ids"], pg.tp_group).detach()
        loss = out["lp"].sum() * 0
        return loss, {"loss": loss.detach().clone()}

    B, S = ids.shape
    forward_backward([model], make_forward_step(loss_fn), iter([batch]), 1, pg, seq_length=S, micro_batch_size=B,
                     forward_only=True)
    if "lp" not in out:
        return None
    P = enc["input_ids"].shape[1]
    return out["lp"][0, P - 1:P - 1 + len(response)].tolist()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import torch.distributed as dist
    from transformers import AutoProcessor

    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore
    from megatron_papo.parallel import init_distributed, shutdown

    pg = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp, device="cpu"))
    dirs = [args.hf, None]
    if pg.rank == 0:
        work = Path(tempfile.mkdtemp(prefix="check_weight_sync_"))
        if args.hf is None:
            from megatron_papo.fixtures.tiny import make_tiny

            dirs[0] = str(make_tiny(work / "model"))
        dirs[1] = str(work / "actor")
        perturb_checkpoint(dirs[0], dirs[1], args.perturb)
    dist.broadcast_object_list(dirs, src=0)
    engine_dir, actor_dir = dirs
    model = build_model(None, pg, hf_dir=actor_dir)
    load_hf_into_mcore([model], actor_dir)
    processor = AutoProcessor.from_pretrained(engine_dir)
    batch = prompts(processor)

    from megatron_papo.config import load_config
    from megatron_papo.rollout.fleet import RolloutFleet, default_engine_factory

    placement = (["rollout.placement=separate", "rollout.mode=server", f"rollout.num_engines={args.separate}"]
                 if args.separate else [f"rollout.engine_tp={args.engine_tp}"])
    cfg = load_config(None, [*placement, f"rollout.transport={args.transport}", f"rollout.bucket_mb={args.bucket_mb}",
                             "rollout.timeout_s=600", f"parallel.tp={args.tp}", f"parallel.pp={args.pp}"])
    fleet = RolloutFleet.build(cfg, pg, engine_dir, default_engine_factory)
    try:
        stats = fleet.sync([model])
        reqs = [(enc["input_ids"][0].tolist(), ims) for enc, ims in batch]

        def decode(engine: Any, _: list[int]) -> list[Any]:  # every engine decodes the whole batch
            res = engine.generate(reqs, sampling={"temperature": 0.0, "max_new_tokens": args.max_new_tokens})
            return [([g[0].token_ids for g in res], [g[0].logprobs for g in res], engine.banned_ids, engine.eos_ids)]

        per_engine = [r for _, r in fleet.map_blocks(list(range(fleet.num_engines)), decode, "check decode")]
        result: dict[str, Any] = {"engines": fleet.num_engines}
        if args.check_transformers:  # transformers holding the perturbed weights (on every rank: same answer)
            from transformers import Qwen2_5_VLForConditionalGeneration

            from megatron_papo.rollout.hf_reference import hf_greedy

            _, _, banned, eos = per_engine[0]
            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(actor_dir, dtype=torch.float32).eval()
            ref = [hf_greedy(hf, enc, banned, eos, args.max_new_tokens) for enc, _ in batch]
            result["greedy_equal_transformers_per_engine"] = [all(r[0] == t for r, t in zip(ref, toks))
                                                              for toks, _, _, _ in per_engine]
            result["greedy_equal_transformers"] = all(result["greedy_equal_transformers_per_engine"])
            result["max_abs_logprob_diff_transformers_per_engine"] = [
                max(abs(a - b) for r, elp in zip(ref, lps) for a, b in zip(r[1], elp)) for _, lps, _, _ in per_engine]
            result["max_abs_logprob_diff_transformers"] = max(result["max_abs_logprob_diff_transformers_per_engine"])
        diffs, tokens = [], 0
        for responses, engine_lps, banned, _ in per_engine:
            diff = 0.0
            for (enc, _), resp, elp in zip(batch, responses, engine_lps):
                alp = actor_logprobs(model, pg, enc, resp, banned)
                if alp is not None:
                    diff = max(diff, max(abs(a - b) for a, b in zip(alp, elp)))
                    tokens += len(resp)
            t = torch.tensor([diff], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            diffs.append(float(t[0]))
        t = torch.tensor([float(tokens)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        diff, tokens = max(diffs), int(t[0])
        result["max_abs_logprob_diff_per_engine"] = diffs
    finally:
        fleet.shutdown()
    ok = diff <= args.atol and result.get("greedy_equal_transformers", True)
    if pg.rank == 0:
        line = json.dumps({"max_abs_logprob_diff": diff, "tp": args.tp, "pp": args.pp, "dp": pg.dp_size,
                           "engine": args.engine, "separate": args.separate, "transport": args.transport, "tokens": tokens,
                           "sync_seconds": round(stats["seconds"], 3),
                           "sync_bytes": int(stats["bytes"]), **result})
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text(line + "\n")
    shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
