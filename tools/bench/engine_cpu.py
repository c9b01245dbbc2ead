"""Per-process CPU of SGLang CPU engines during a rollout round: 1 engine vs 2 engines side by side.

    OMP_NUM_THREADS=1 python tools/bench/engine_cpu.py [--prompts 64 --samples 8 --max-new-tokens 16 --repeats 4]

One process drives two real SGLang CPU engines (``rollout_phase.generate_block``: seeded per-sample requests,
decoding and rewards included). Each round is timed with one engine doing all prompts, or both engines doing half
each from two threads, in alternating order; for every round it prints the wall time and the CPU-seconds spent by
the driver and by each engine's host (SGLang's tokenizer manager), scheduler and detokenizer (psutil). Set
``OMP_NUM_THREADS=1`` as torchrun does for 2 processes: otherwise each scheduler runs one OpenMP thread per core
and two engines on 2 cores thrash. Where ``tools/bench/rollout_fleet.py`` gives the fleet's throughput ratio, this
says which process the time goes to (README "Scaling").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", dest="n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=4, help="rounds per case after one warm-up round each")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import psutil
    from transformers import AutoProcessor

    from megatron_papo.config import load_config
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.fixtures.tiny import make_tiny
    from megatron_papo.rewards import get_reward_fn
    from megatron_papo.rollout_phase import generate_block, make_engine

    cfg = load_config("tiny_cpu", ["rollout.timeout_s=900"])
    hf_dir = str(make_tiny(Path(tempfile.mkdtemp(prefix="bench_engine_cpu_")) / "model"))
    processor = AutoProcessor.from_pretrained(hf_dir)
    ds = load_prompt_dataset("synthetic", cfg.data, processor, "train")
    samples = [ds.encode(i) for i in range(args.prompts)]
    reward_fn = get_reward_fn(cfg.data.reward)
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    engines = [make_engine(dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + k), hf_dir).start() for k in range(2)]
    try:
        roles: dict[str, list[Any]] = {"driver": [psutil.Process()]}
        for k, e in enumerate(engines):
            host = psutil.Process(e.host_pid)
            kids = host.children(recursive=True)
            roles[f"host{k}"] = [host]
            roles[f"scheduler{k}"] = [c for c in kids if "scheduler" in " ".join(c.cmdline())]
            roles[f"detokenizer{k}"] = [c for c in kids if "detokenizer" in " ".join(c.cmdline())]

        def cpu() -> dict[str, float]:
            return {r: sum(q.cpu_times().user + q.cpu_times().system for q in ps) for r, ps in roles.items()}

        def run(k: int, block: list[Any], step: int) -> None:
            generate_block(engines[k], block, n=args.n, sampling=sampling, step=step, seed=1,
                           tokenizer=processor.tokenizer, reward_fn=reward_fn)

        half = len(samples) // 2
        for rep in range(1 + args.repeats):
            for case in (["1", "2"] if rep % 2 == 0 else ["2", "1"]):
                c0, t0 = cpu(), time.perf_counter()
                if case == "1":
                    run(0, samples, rep)
                else:
                    threads = [threading.Thread(target=run, args=(k, blk, rep))
                               for k, blk in enumerate((samples[:half], samples[half:]))]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                wall, c1 = time.perf_counter() - t0, cpu()
                print(json.dumps({"engines": int(case), "warmup": rep == 0, "wall_s": round(wall, 3),
                                  "tok_per_s": round(len(samples) * args.n * args.max_new_tokens / wall),
                                  "cpu_s": {r: round(c1[r] - c0[r], 3) for r in c0}}), flush=True)
    finally:
        for e in engines:
            e.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
