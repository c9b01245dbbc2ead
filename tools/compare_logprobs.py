"""Per-token log-prob parity of the Megatron-Core Qwen2.5-VL vs transformers (``megatron-papo compare-logprobs``).

    torchrun --nproc-per-node 4 tools/compare_logprobs.py --tp 2 --pp 2 [--hf DIR] [--samples FILE.jsonl]
    python tools/compare_logprobs.py                      # TP=1, built-in samples, a tiny model built offline

Loads the HF directory into the mcore model (through ``hf_adapter``), computes log p(token) of a fixed
multimodal batch with mcore (vocab-parallel, under mcore's schedule) and with transformers'
``Qwen2_5_VLForConditionalGeneration`` (given ``attention_mask`` and ``mm_token_type_ids``), prints one
JSON line ``{"max_abs_logprob_diff", "tp", "pp", "tokens"}`` and exits 1 above ``--atol``.
``--samples``: JSONL rows ``{"prompt": str, "images": [paths], "response": str}``. Without ``--hf`` a
tiny checkpoint is built offline (``--untied`` for the 7B-like layout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-papo compare-logprobs", description=__doc__.splitlines()[0])
    p.add_argument("--hf", default=None, help="HF Qwen2.5-VL directory (default: build a tiny one offline)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (tp > 1)")
    p.add_argument("--samples", default=None, help="JSONL of {prompt, images, response} (default: built-in set)")
    p.add_argument("--padding-side", choices=["left", "right"], default="left", help="batch padding side")
    p.add_argument("--atol", type=float, default=1e-4, help="max allowed |logp_mcore - logp_transformers|")
    p.add_argument("--out", default=None, help="also write the JSON line to this file")
    p.add_argument("--untied", action="store_true", help="tiny model with untied embeddings, 4 layers")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import torch.distributed as dist
    from transformers import AutoProcessor

    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore, parity
    from megatron_papo.parallel import init_distributed, shutdown

    pg = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp, sequence_parallel=args.sequence_parallel,
                                         device="cpu"))
    hf = [args.hf]
    if args.hf is None:
        if pg.rank == 0:
            from megatron_papo.fixtures.tiny import make_tiny

            extra = dict(num_layers=4, tie_word_embeddings=False, seed=1) if args.untied else {}
            hf = [str(make_tiny(Path(tempfile.mkdtemp(prefix="tiny_qwen_")) / "model", **extra))]
        dist.broadcast_object_list(hf, src=0)
    hf_dir = hf[0]
    model = build_model(None, pg, hf_dir=hf_dir, sequence_parallel=args.sequence_parallel)
    load_hf_into_mcore([model], hf_dir)
    samples = parity.load_samples(args.samples) if args.samples else parity.builtin_samples()
    batch = parity.make_batch(AutoProcessor.from_pretrained(hf_dir), samples, args.padding_side)
    lp = parity.mcore_token_logprobs([model], batch, pg)
    stats = torch.zeros(2)
    if lp is not None and pg.tp_rank == 0:
        mask = parity.token_mask(batch)
        ref = parity.hf_token_logprobs(hf_dir, batch)
        stats = torch.tensor([float((lp - ref).abs()[mask].max()), float(mask.sum())])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    diff, tokens = float(stats[0]), int(stats[1])
    if pg.rank == 0:
        line = json.dumps({"max_abs_logprob_diff": diff, "tp": args.tp, "pp": args.pp, "tokens": tokens})
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text(line + "\n")
    shutdown()
    return 0 if diff <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
