"""Convert Qwen2.5-VL checkpoints: Megatron-Core dist-checkpoint ⇄ HF directory (``megatron-papo convert``).

    # a training run's checkpoint (any TP/PP) -> an HF directory transformers / SGLang / vLLM load as-is
    megatron-papo convert mcore2hf --ckpt runs/x/checkpoints --hf-base /models/Qwen2.5-VL-7B-Instruct --out /models/x-hf
    # an HF directory -> a model-only dist-checkpoint, here sharded for TP=2 x PP=2 (4 processes)
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py hf2mcore --hf /models/Qwen2.5-VL-7B-Instruct --out ckpt --tp 2 --pp 2

``--ckpt`` takes a run dir, its ``checkpoints/`` root (the ``latest`` step) or one ``step_XXXXXX`` dir.
Dist-checkpoints reshard on load, so ``mcore2hf`` runs in one process at TP=1, PP=1 by default
(``--tp/--pp`` under torchrun with tp*pp processes split the work). Weights are streamed: the model is
held once and the export is written one safetensors shard (``--shard-size``) at a time. ``--verify``
compares per-token log-probs of source and result on a built-in multimodal batch (transformers on the
HF side) and exits 1 above ``--atol``. Bad inputs exit 2 with one line naming the problem.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"2MB"`` or plain bytes → bytes (decimal and binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size '{text}' (examples: 5GB, 500MiB, 1048576)")
    num, unit = float(m.group(1)), (m.group(2) or "B")
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("B").rstrip("I")]
    return max(1, int(num * base ** power))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-papo convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="direction", required=True)
    m = sub.add_parser("mcore2hf", help="dist-checkpoint (any TP/PP) -> HF directory")
    m.add_argument("--ckpt", required=True, help="RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_XXXXXX")
    m.add_argument("--hf-base", required=True, help="HF dir of the trained model: config, tokenizer, processor are copied")
    m.add_argument("--out", required=True, help="output HF directory")
    m.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), help="max bytes per safetensors shard")
    h = sub.add_parser("hf2mcore", help="HF directory -> model-only dist-checkpoint at --tp/--pp")
    h.add_argument("--hf", required=True, help="HF Qwen2.5-VL directory")
    h.add_argument("--out", required=True, help="checkpoint root to write (step_000000 + latest)")
    for s in (m, h):
        s.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun with tp*pp processes)")
        s.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
        s.add_argument("--dtype", choices=_DTYPES, default="auto",
                       help="tensor dtype; auto: the source's own (checkpoint metadata / config.json)")
        s.add_argument("--device", choices=("cpu", "auto", "cuda"), default="cpu", help="where to hold the model")
        s.add_argument("--verify", action="store_true", help="compare per-token log-probs of source and result")
        s.add_argument("--atol", type=float, default=1e-5, help="--verify tolerance (max |Δ log p|); fp32 default")
        s.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
        s.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    return p


def _check_out(out: Path, force: bool) -> None:
    from megatron_papo.checkpoint.convert import ConvertError

    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"--out {out} is not empty; pass --force to overwrite or choose another directory")


def _check_world(tp: int, pp: int) -> None:
    from megatron_papo.checkpoint.convert import ConvertError

    if tp < 1 or pp < 1:
        raise ConvertError(f"--tp {tp} --pp {pp}: sizes must be >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise ConvertError(f"--tp {tp} --pp {pp} needs {tp * pp} processes, got {world}: run "
                           f"'torchrun --nproc-per-node {tp * pp} tools/convert_checkpoint.py ...' (or use --tp 1 --pp 1)")


def run(args: argparse.Namespace) -> int:
    """Do the conversion (collective); returns the exit code."""
    import torch

    from megatron_papo.checkpoint import convert as cv
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.parallel import init_distributed, shutdown
    from megatron_papo.utils.logging import get_logger, setup_logging

    _check_world(args.tp, args.pp)
    out = Path(args.out)
    dtype: Optional[torch.dtype] = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.direction == "mcore2hf":
        ckpt = cv.resolve_checkpoint(args.ckpt)
        src_hf = cv.check_hf_dir(args.hf_base, weights=False, flag="--hf-base")
    else:
        src_hf = cv.check_hf_dir(args.hf, weights=True, flag="--hf")
    _check_out(out, args.force)
    pg = init_distributed(ParallelConfig(tp=args.tp, pp=args.pp, device=args.device))
    setup_logging(args.log_level, rank=pg.rank)
    log = get_logger("convert")
    try:
        if args.direction == "mcore2hf":
            model = cv.mcore_to_hf(ckpt, src_hf, out, pg, dtype=dtype, max_shard_bytes=args.shard_size)
            result_hf = out
        else:
            if pg.rank == 0 and out.is_dir() and args.force:
                import shutil

                shutil.rmtree(out)
            model = cv.hf_to_mcore(src_hf, out, pg, dtype=dtype)
            result_hf = src_hf
            if args.verify:  # verify what is on disk: wipe the weights and load the written checkpoint back
                from megatron_papo.checkpoint.dist import latest_checkpoint, load_checkpoint

                with torch.no_grad():
                    for p in model.parameters():
                        p.zero_()
                written = latest_checkpoint(out)
                load_checkpoint(written, [cv.as_saved(model, written)], load_rng=False)
        rc = 0
        if args.verify:
            diff = cv.verify_mcore_vs_hf(model, result_hf, pg)
            if diff is not None:
                ok = diff <= args.atol
                print(f"verify: max |dlogp| = {diff:.3e} (atol {args.atol:.1e}) {'OK' if ok else 'FAILED'}", flush=True)
                rc = 0 if ok else 1
            flag = torch.tensor([rc], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            rc = int(flag.item())
        if pg.rank == 0 and rc == 0:
            log.info("done: %s", out)
        return rc
    finally:
        shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; ``ConvertError`` / ``ModelConfigError`` become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    from megatron_papo.checkpoint.convert import ConvertError
    from megatron_papo.models.qwen2_5_vl import ModelConfigError

    try:
        return run(args)
    except (ConvertError, ModelConfigError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
