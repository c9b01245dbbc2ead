"""Converter acceptance: a checkpoint trained at TP=2 x PP=2 → HF → mcore at TP=1 → HF is bit-exact; the HF
export loaded by transformers reproduces the trained mcore actor's log-probs (1e-5, CPU fp32); SGLang serves it.

The "trained" checkpoint is made like the trainer makes one: the actor at TP=2, PP=2 (4 gloo ranks) loaded
from the tiny HF checkpoint, wrapped in mcore DDP, one Adam step on a log-prob loss under mcore's pipeline
schedule, ``save_checkpoint`` with the optimizer state. The workers below run under ``tests/harness.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from tests.harness import REPO, run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
HERE = "tests.integration.test_convert_roundtrip"


# ---------------------------------------------------------------- workers (run under torchrun)
def train_and_save_tp2pp2(hf_dir: str, run_dir: str, hf2mcore_out: str) -> dict[str, Any]:
    """One training step at TP=2 x PP=2, saved like the trainer saves; also ``hf_to_mcore`` at TP=2 x PP=2."""
    from megatron_papo.checkpoint.convert import hf_to_mcore, sample_batch
    from megatron_papo.checkpoint.dist import save_checkpoint
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore
    from megatron_papo.models.qwen2_5_vl.parity import mcore_token_logprobs, token_mask
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings, build_optimizer, optimizer_step, wrap_ddp, zero_grads

    pg = init_distributed(ParallelConfig(tp=2, pp=2, device="cpu"))
    model = build_model(None, pg, hf_dir=hf_dir)
    load_hf_into_mcore([model], hf_dir, pg)
    chunks = wrap_ddp([model], pg)
    opt = build_optimizer(chunks, OptimSettings(lr=3e-2, clip_grad=0.0), pg)
    batch = sample_batch(Path(hf_dir))
    zero_grads(chunks, opt)
    mcore_token_logprobs(chunks, batch, pg, grad_scale=token_mask(batch).float())
    updated, grad_norm, _ = optimizer_step(opt)
    assert updated and grad_norm > 0
    save_checkpoint(Path(run_dir) / "checkpoints", 1, chunks, opt, trainer_state={"loader": {}, "skipped_updates": 0})
    for c in chunks:
        c.eval()
    with torch.no_grad():
        logp = mcore_token_logprobs(chunks, batch, pg)
    hf_to_mcore(Path(hf_dir), Path(hf2mcore_out), pg)
    return {"logp": logp.tolist() if logp is not None and pg.tp_rank == 0 else None}


def convert_at_tp1(jobs: list[list[str]]) -> None:
    """Run ``[direction, src, hf_dir_or_base, out]`` conversions in one process at TP=1, PP=1."""
    from megatron_papo.checkpoint.convert import hf_to_mcore, mcore_to_hf, resolve_checkpoint
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.parallel import init_distributed

    pg = init_distributed(ParallelConfig(tp=1, pp=1, device="cpu"))
    for direction, src, base, out in jobs:
        if direction == "hf2mcore":
            hf_to_mcore(Path(src), Path(out), pg)
        else:
            mcore_to_hf(resolve_checkpoint(src), Path(base), Path(out), pg, max_shard_bytes=200_000)


# ---------------------------------------------------------------- helpers
def read_hf(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors, by stored name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: names differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k} dtype/shape differ"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max {float((a[k] - b[k]).abs().max()):.3e})"


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """Train+save at TP2xPP2, export via the CLI (with --verify), then HF→mcore(TP1)→HF in one process."""
    tmp = tmp_path_factory.mktemp("convert")
    paths = {k: tmp / k for k in ("run", "hf_a", "ck_b", "hf_b", "ck_c", "hf_c")}
    res = run_distributed(f"{HERE}:train_and_save_tp2pp2", 4,
                          {"hf_dir": str(tiny_model_dir), "run_dir": str(paths["run"]), "hf2mcore_out": str(paths["ck_c"])},
                          timeout=600)
    logp = next(r["logp"] for r in res if r["logp"] is not None)
    cli = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "convert", "mcore2hf", "--ckpt", str(paths["run"]),
                          "--hf-base", str(tiny_model_dir), "--out", str(paths["hf_a"]), "--shard-size", "300KB", "--verify"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert cli.returncode == 0, f"convert mcore2hf failed:\n{cli.stdout[-3000:]}\n{cli.stderr[-6000:]}"
    run_distributed(f"{HERE}:convert_at_tp1", 1, {"jobs": [
        ["hf2mcore", str(paths["hf_a"]), "", str(paths["ck_b"])],
        ["mcore2hf", str(paths["ck_b"]), str(paths["hf_a"]), str(paths["hf_b"])],
        ["mcore2hf", str(paths["ck_c"]), str(tiny_model_dir), str(paths["hf_c"])],
    ]}, timeout=600)
    return {**paths, "logp": torch.tensor(logp), "cli": cli, "tiny": Path(tiny_model_dir)}


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}


# ---------------------------------------------------------------- tests
def test_export_layout_and_cli_verify(converted):
    hf_a: Path = converted["hf_a"]
    assert "verify: max |dlogp|" in converted["cli"].stdout and "OK" in converted["cli"].stdout
    index = hf_a / "model.safetensors.index.json"
    assert index.is_file() and len(list(hf_a.glob("model-*-of-*.safetensors"))) > 1
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "processor_config.json"):
        assert (hf_a / name).is_file(), f"{name} not copied from the base"
    import json

    weight_map = json.loads(index.read_text())["weight_map"]
    assert set(weight_map) == set(read_hf(hf_a)) == set(read_hf(converted["tiny"]))


def test_trained_tp2pp2_roundtrip_is_bit_exact(converted):
    tiny, hf_a, hf_b = read_hf(converted["tiny"]), read_hf(converted["hf_a"]), read_hf(converted["hf_b"])
    changed = [k for k in tiny if not torch.equal(tiny[k], hf_a[k])]
    assert len(changed) > len(tiny) // 2, "the TP2xPP2 training step changed too few tensors to test anything"
    assert_bit_exact(hf_a, hf_b, "TP2xPP2 -> HF -> mcore TP1 -> HF")


def test_hf2mcore_at_tp2pp2_roundtrip_is_bit_exact(converted):
    assert_bit_exact(read_hf(converted["tiny"]), read_hf(converted["hf_c"]), "HF -> mcore TP2xPP2 -> HF (TP1)")


def test_transformers_logprobs_match_trained_actor(converted):
    from megatron_papo.checkpoint.convert import sample_batch
    from megatron_papo.models.qwen2_5_vl.parity import hf_token_logprobs, token_mask

    batch = sample_batch(converted["hf_a"])
    ref = hf_token_logprobs(converted["hf_a"], batch)
    mask = token_mask(batch)
    diff = float((ref - converted["logp"]).abs()[mask].max())
    print(f"transformers(export) vs mcore actor TP2xPP2: max |dlogp| = {diff:.2e} over {int(mask.sum())} tokens")
    assert diff <= 1e-5
    base = hf_token_logprobs(converted["tiny"], batch)
    assert float((base - ref).abs()[mask].max()) > 1e-3, "export equals the untrained model"


@pytest.mark.engine
def test_sglang_serves_export(converted):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megatron_papo.rollout.sglang_engine import SGLangEngine
    from tests.integration import sglang_reference as ref
    QUESTIONS, encode, hf_greedy, make_image = ref.QUESTIONS, ref.encode, ref.hf_greedy, ref.make_image  # noqa: N806

    hf_a = converted["hf_a"]
    processor = AutoProcessor.from_pretrained(str(hf_a))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_a), dtype=torch.float32).eval()
    items = [(QUESTIONS[0], [make_image(0)]), (QUESTIONS[2], [])]
    encs = [encode(processor, q, ims) for q, ims in items]
    with SGLangEngine(str(hf_a), timeout_s=300) as eng:
        res = eng.generate([(e["input_ids"][0].tolist(), ims) for e, (_, ims) in zip(encs, items)], n=1,
                           sampling={"temperature": 0.0, "max_new_tokens": 4})
        banned, eos = eng.banned_ids, eng.eos_ids
    for enc, (r,) in zip(encs, res):
        ref_ids, ref_lp = _greedy(hf_greedy, model, enc, banned, eos)
        assert r.token_ids == ref_ids
        assert max(abs(a - b) for a, b in zip(r.logprobs, ref_lp)) < 1e-5


def _greedy(fn: Any, model: Any, enc: dict[str, torch.Tensor], banned: list[int], eos: list[int],
            n: Optional[int] = 4) -> tuple[list[int], list[float]]:
    with torch.no_grad():
        return fn(model, enc, banned, eos, n)
