"""Forward+backward throughput of the mcore Qwen2.5-VL vs transformers' on the same checkpoint (CPU, fp32).

    OMP_NUM_THREADS=1 python tools/bench/model_step.py [--repeats 5] [--copies 2]

Builds a tiny-but-not-trivial checkpoint offline (text hidden 256, 4 layers, 8 heads / 2 KV heads,
vocab 1024; vision depth 4, hidden 128), loads it into both models, and times one step = forward +
backward of a token-mean log-prob loss on the built-in multimodal batch (repeated ``--copies`` times:
two images of different sizes, a text-only sample, one image; left padding). mcore runs at TP=1 in
one process through the same forward the trainer uses; transformers uses its default (SDPA)
attention. Reported (one JSON line): tokens/s of each (minimum step time over ``--repeats`` after a
warm-up, the two models alternating; the minimum is the least disturbed by other load on a shared
machine) and the ratio
mcore/transformers (goal >= 0.9), by wall time and by this process's CPU time (one thread, so CPU
time is the work done; ``ratio`` is the CPU-time one, which other jobs on a shared machine disturb least).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BENCH_MODEL = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                   vocab_size=1024, vision_depth=4, vision_hidden_size=128, vision_heads=4,
                   vision_intermediate_size=256, tie_word_embeddings=False, seed=3)


def _time_interleaved(steps: dict[str, Callable[[], None]], repeats: int
                      ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm each step up once, then alternate them ``repeats`` times; (wall seconds, process CPU seconds)."""
    for fn in steps.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model (after one warm-up)")
    p.add_argument("--copies", type=int, default=2, help="how many copies of the built-in batch in one step")
    p.add_argument("--hf", default=None, help="HF dir to use instead of the built-in bench model")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.fixtures.tiny import make_tiny
    from megatron_papo.models.qwen2_5_vl import build_model, forward_logits, load_hf_into_mcore, parity
    from megatron_papo.parallel import init_distributed, shutdown

    hf_dir = args.hf or str(make_tiny(Path(tempfile.mkdtemp(prefix="bench_qwen_")) / "model", **BENCH_MODEL))
    batch = parity.make_batch(AutoProcessor.from_pretrained(hf_dir), parity.builtin_samples() * args.copies, "left")
    mask = parity.token_mask(batch)
    weights = mask.float() / mask.sum()
    tokens = int(batch["attention_mask"].sum())

    pg = init_distributed(ParallelConfig(tp=1, pp=1, device="cpu"))
    mc = build_model(None, pg, hf_dir=hf_dir)
    load_hf_into_mcore([mc], hf_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    mc.train()
    hf.train()
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)

    def mcore_step() -> None:
        mc.zero_grad(set_to_none=True)
        logits = forward_logits(mc, batch)
        lp = parity.vocab_parallel_logprobs(logits, batch["input_ids"], pg.tp_group)
        (-(lp * weights).sum()).backward()

    def hf_step() -> None:
        hf.zero_grad(set_to_none=True)
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                    "mm_token_type_ids")}
        logits = hf(**kw).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels).squeeze(-1)
        (-(lp * weights).sum()).backward()

    res: dict[str, Any] = {"tokens_per_step": tokens, "batch": list(batch["input_ids"].shape)}
    wall, cpu = _time_interleaved({"mcore": mcore_step, "transformers": hf_step}, args.repeats)
    for kind, times in (("wall", wall), ("cpu", cpu)):
        mc_best, hf_best = min(times["mcore"]), min(times["transformers"])
        res[kind] = dict(mcore_tokens_per_s=round(tokens / mc_best, 1),
                         transformers_tokens_per_s=round(tokens / hf_best, 1), ratio=round(hf_best / mc_best, 3),
                         median_s={k: round(statistics.median(v), 4) for k, v in times.items()})
    res["ratio"] = res["cpu"]["ratio"]
    print(json.dumps(res), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
