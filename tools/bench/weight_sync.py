"""Weight-sync time at TP=2 on CPU vs its lower bound measured in the same run.

    torchrun --nproc-per-node 2 tools/bench/weight_sync.py --tp 2 [--hidden 1024 --layers 4] [--engine]

Builds a Qwen2.5-VL of >= 100 MB fp32 (the tiny fixture with bigger dimensions, offline), loads it into
the mcore actor at ``--tp``, then times ``weight_sync.sync_weights`` into a sink:

* default sink: packs every bucket into the transport's flat buffer (``weight_transport.flatten_bucket``,
  the copy the ``tensor`` transport makes) — i.e. plan + TP all-gather + HF mapping + pack;
* ``--engine``: a real SGLang engine (rank 0) with ``--transport``; its load time is included.

Lower bound (same run, same bytes): one ``all_gather_into_tensor`` of this rank's shard bytes over the TP
group plus one memcpy of the full model bytes. Prints one JSON line with both (min over ``--repeats``)
and their ratio (goal <= 2); ``median_ratio`` uses the medians (the first repeats pay page faults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class PackSink:
    """Stand-in engine: copies each bucket into one flat transport buffer, like the tensor transport."""

    def update_weights(self, buckets: Any, **_: Any) -> None:
        from megatron_papo.rollout.weight_transport import flatten_bucket

        for bucket in buckets:
            flatten_bucket(bucket, shared=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", action="store_true", help="push into a real SGLang engine on rank 0")
    p.add_argument("--transport", default="tensor", choices=["tensor", "distributed", "disk"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore
    from megatron_papo.parallel import init_distributed, shutdown
    from megatron_papo.rollout.weight_sync import sync_weights

    pg = init_distributed(ParallelConfig(tp=args.tp, pp=1, device="cpu"))
    dirs = [None]
    if pg.rank == 0:
        from megatron_papo.fixtures.tiny import make_tiny

        dirs[0] = str(make_tiny(Path(tempfile.mkdtemp(prefix="bench_sync_")) / "model", hidden_size=args.hidden,
                                num_layers=args.layers, intermediate_size=args.intermediate, num_heads=16, num_kv_heads=4))
    dist.broadcast_object_list(dirs, src=0)
    model = build_model(None, pg, hf_dir=dirs[0])
    load_hf_into_mcore([model], dirs[0])
    local_bytes = sum(q.numel() * q.element_size() for q in model.parameters())

    engine: Any = PackSink()
    if args.engine and pg.rank == 0:
        from megatron_papo.rollout.sglang_engine import SGLangEngine

        engine = SGLangEngine(dirs[0], timeout_s=900, transport=args.transport).start()
    elif args.engine:
        engine = None
    sync_times, bound_times, full_bytes = [], [], 0
    try:
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            stats = sync_weights([model], engine if (pg.rank == 0 or not args.engine) else None, bucket_mb=args.bucket_mb)
            dist.barrier()
            sync_times.append(time.perf_counter() - t0)
            full_bytes = int(stats["bytes"])
            # lower bound: gather the same shard bytes once + one memcpy of the full bytes
            send = torch.empty(local_bytes // 4, dtype=torch.float32)
            recv = torch.empty(args.tp * send.numel(), dtype=torch.float32)
            dst = torch.empty(full_bytes // 4, dtype=torch.float32)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_gather_into_tensor(recv, send, group=pg.tp_group)
            dst.copy_(recv[:dst.numel()])  # tp * local bytes >= full bytes (replicated params count on every rank)
            dist.barrier()
            bound_times.append(time.perf_counter() - t0)
            del send, recv, dst
    finally:
        if args.engine and pg.rank == 0 and engine is not None:
            engine.shutdown()
    if pg.rank == 0:
        line = json.dumps({"tp": args.tp, "model_mb": round(full_bytes / 2**20, 1), "bucket_mb": args.bucket_mb,
                           "sink": f"sglang/{args.transport}" if args.engine else "pack", "sync_s": round(min(sync_times), 4),
                           "lower_bound_s": round(min(bound_times), 4), "ratio": round(min(sync_times) / min(bound_times), 2),
                           "median_ratio": round(statistics.median(sync_times) / statistics.median(bound_times), 2),
                           "sync_s_all": [round(x, 4) for x in sync_times], "bound_s_all": [round(x, 4) for x in bound_times]})
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text(line + "\n")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
