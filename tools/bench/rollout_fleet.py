"""Rollout fleet scaling on CPU: the same prompts on 1 engine and on 2 engines, round-robin in one run.

    torchrun --nproc-per-node 2 tools/bench/rollout_fleet.py [--prompts 64 --samples 8 --max-new-tokens 16 --repeats 4]
    torchrun --nproc-per-node 2 tools/bench/rollout_fleet.py --pp 2     # owners on both pipeline stages

Two processes each own a real SGLang CPU engine (a colocated fleet, ``rollout/fleet.py``). The 1-engine case is
the same fleet restricted to engine 0 (rank 0's), so both cases share engines, prompts and weights. Each repeat
times, for each fleet in alternating order and as a training step does: a full weight sync of the mcore actor
(TP=1; ``--pp 2``: the stage-1 owner gets its buckets by the all-stages PP broadcast; it flushes the engines'
caches), then generation of ``--prompts`` x ``--n`` responses of exactly ``--max-new-tokens`` tokens
(``ignore_eos``; rewards, the gather to every rank and the groups included). So every generation starts from
flushed caches; until late 2026-12-04 the two generations of a repeat ran back to back and the second found the first's
prompts in engine 0's prefix cache, and each sync flushed whatever the generations had left. Prints one
JSON line: medians after ``--warmup`` repeats, the ratios (goals: generation throughput 2 engines / 1 engine
>= 1.6, sync time 2 / 1 <= 1.3), every sample, the load average before and after, and per repeat a digest of
every generated token id and log-prob (the same seeds each repeat on both fleets: equal digests say 1 and 2 engines
sampled the same outputs; compare them across commits to check that an engine change kept its outputs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    # not --n: torchrun takes any abbreviation of its own options (--nnodes, --nproc-per-node) even after the script
    p.add_argument("--samples", dest="n", type=int, default=8, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=4, help="timed repeats (round-robin) after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pp", type=int, default=1, help="actor pipeline stages (2: an engine owner on each stage)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch.distributed as dist
    from transformers import AutoProcessor

    from megatron_papo.config import load_config
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore
    from megatron_papo.parallel import init_distributed, shutdown
    from megatron_papo.rewards import get_reward_fn
    from megatron_papo.rollout.fleet import RolloutFleet, default_engine_factory

    cfg = load_config("tiny_cpu", [f"parallel.pp={args.pp}", "rollout.timeout_s=900"])
    pg = init_distributed(cfg.parallel, seed=cfg.seed)
    load_before = os.getloadavg()
    dirs: list[Any] = [None]
    if pg.rank == 0:
        from megatron_papo.fixtures.tiny import make_tiny

        dirs[0] = str(make_tiny(Path(tempfile.mkdtemp(prefix="bench_fleet_")) / "model"))
    dist.broadcast_object_list(dirs, src=0)
    hf_dir = dirs[0]
    model = build_model(None, pg, hf_dir=hf_dir)
    load_hf_into_mcore([model], hf_dir)
    processor = AutoProcessor.from_pretrained(hf_dir)
    ds = load_prompt_dataset("synthetic", cfg.data, processor, "train")
    samples = [ds.encode(i) for i in range(args.prompts)]
    reward_fn = get_reward_fn(cfg.data.reward)

    t0 = time.perf_counter()
    two = RolloutFleet.build(cfg, pg, hf_dir, default_engine_factory)
    start_s = time.perf_counter() - t0
    one = RolloutFleet(two.slots[:1], pg.rank, pg.world_size, {0: two.engines[0]} if 0 in two.engines else {},
                       transport=two.transport, bucket_mb=two.bucket_mb, device_type="cpu")
    fleets = {"1": one, "2": two}
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    times: dict[str, dict[str, list[float]]] = {k: {"gen_s": [], "tok_per_s": [], "sync_s": []} for k in fleets}
    digests: dict[str, list[str]] = {k: [] for k in fleets}  # per repeat: sha256 of every token id and log-prob
    try:
        for rep in range(args.warmup + args.repeats):
            order = ["1", "2"] if rep % 2 == 0 else ["2", "1"]
            for k in order:  # as in training: a weight sync (which flushes the engines' caches), then a rollout
                dist.barrier()
                t = time.perf_counter()
                fleets[k].sync([model])
                dist.barrier()
                if rep >= args.warmup:
                    times[k]["sync_s"].append(time.perf_counter() - t)
                t = time.perf_counter()
                groups = fleets[k].generate_groups(samples, n=args.n, sampling=sampling, step=rep, seed=1,
                                                   tokenizer=processor.tokenizer, reward_fn=reward_fn, data_cfg=cfg.data,
                                                   processor=processor, make_aug=False)
                dt = time.perf_counter() - t
                tokens = sum(len(r) for g in groups for r in g.response_ids)
                assert tokens == args.prompts * args.n * args.max_new_tokens, tokens
                assert {g.engine for g in groups} == set(range(fleets[k].num_engines))
                digests[k].append(hashlib.sha256(repr([(g.response_ids, g.engine_logprobs) for g in groups]).encode())
                                  .hexdigest()[:16])
                if rep >= args.warmup:
                    times[k]["gen_s"].append(dt)
                    times[k]["tok_per_s"].append(tokens / dt)
    finally:
        two.shutdown()
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    line = {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens, "pp": args.pp,
            "repeats": args.repeats, "engines_start_s": round(start_s, 1),
            "median": {k: {m: round(x, 3) for m, x in d.items()} for k, d in med.items()},
            "throughput_ratio_2_over_1": round(med["2"]["tok_per_s"] / med["1"]["tok_per_s"], 2),
            "sync_ratio_2_over_1": round(med["2"]["sync_s"] / med["1"]["sync_s"], 2),
            "samples": {k: {m: [round(x, 3) for x in v] for m, v in d.items()} for k, d in times.items()},
            "output_digests": digests, "same_outputs_1_and_2_engines": digests["1"] == digests["2"],
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    if pg.rank == 0:
        print(json.dumps(line), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(line) + "\n")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
