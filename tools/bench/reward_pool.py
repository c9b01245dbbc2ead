"""Cost of scoring rewards in the worker pool vs in process, at the tiny task's size (16 prompts x 8 one-word
responses per step = 16 calls of 8). Variants run round robin (one step each in turn) so machine drift hits all
alike. Prints one JSON object: per variant the median milliseconds per step and per call, the pool's start-up
time (first call: spawning the workers and importing the reward modules), and the overhead vs a direct call.

    .venv/bin/python tools/bench/reward_pool.py --rounds 30
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

COLOURS = ["red", "green", "blue", "yellow"]


def main(argv: list[str] | None = None) -> int:
    from megatron_papo.rewards import get_reward_fn
    from megatron_papo.rewards.pool import RewardPool

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="measured steps per variant")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="responses per prompt (one call each prompt)")
    p.add_argument("--reward", default="synthetic")
    args = p.parse_args(argv)
    rng = random.Random(0)
    step = [([rng.choice(COLOURS) for _ in range(args.n)], [rng.choice(COLOURS)] * args.n) for _ in range(args.prompts)]
    direct = get_reward_fn(args.reward)
    variants = {"direct": direct, "pool_w0": RewardPool(args.reward, workers=0),
                "pool_w1": RewardPool(args.reward, workers=1), "pool_w2": RewardPool(args.reward, workers=2)}
    startup = {}
    for name, fn in variants.items():  # first call: workers start (spawn + imports)
        t = time.perf_counter()
        fn(*step[0])
        startup[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            for texts, answers in step:
                fn(texts, answers)
            times[name].append(time.perf_counter() - t)
    for fn in variants.values():
        if hasattr(fn, "close"):
            fn.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"calls_per_step": args.prompts, "responses_per_call": args.n, "rounds": args.rounds,
           "ms_per_step": {k: round(1e3 * v, 3) for k, v in med.items()},
           "ms_per_call": {k: round(1e3 * v / args.prompts, 4) for k, v in med.items()},
           "overhead_ms_per_step_vs_direct": {k: round(1e3 * (v - med["direct"]), 3) for k, v in med.items()},
           "first_call_s": {k: round(v, 3) for k, v in startup.items()}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
