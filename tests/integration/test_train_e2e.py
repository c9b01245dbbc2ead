"""End-to-end training on the tiny model with the real SGLang engine: metrics, parallel layouts, debug modes.

Exact resume (SIGTERM, SIGKILL, a truncated checkpoint, live rollouts) is in ``test_lose_nothing.py``.

Each run is ``megatron-papo train --config tiny_cpu`` (PAPO on, reference KL, masked views) shortened
to a few steps and a small synthetic train split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO, free_port, run_distributed

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SHORT = ["data.synthetic_train_size=64", "data.synthetic_test_size=16", "eval_n=1", "logging.progress=false"]
REQUIRED = ["step", "reward/mean", "reward/accuracy", "loss/pg", "loss/kl_prcp", "entropy/ori", "entropy/aug",
            "clipfrac/high", "kl/ref", "rollout/logprob_gap", "timing/rollout", "timing/update", "timing/sync",
            "throughput/tokens_per_s"]
# first-step values that must not depend on the parallel layout (timings and throughput do)
LAYOUT_FREE = ["reward/mean", "reward/accuracy", "loss/pg", "loss/kl_prcp", "loss/kl_ref", "loss/total", "kl/prcp", "kl/ref",
               "entropy/ori", "entropy/aug", "clipfrac/high", "ppo_kl", "grad_norm"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _cmd(run_dir: Path, nproc: int, extra: list[str]) -> list[str]:
    args = ["-m", "megatron_papo.cli", "train", "--config", "tiny_cpu", f"run_dir={run_dir}", *SHORT, *extra]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", *args]


def _train(run_dir: Path, nproc: int = 1, extra: list[str] = (), timeout: float = 900) -> list[dict]:
    proc = subprocess.run(_cmd(run_dir, nproc, list(extra)), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return _metrics(run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def verify_exports(ckpt: str, hf_base: str, exports: list[str]) -> dict:
    """Worker (1 gloo rank): the converter's ``--verify`` against HF exports written during training: max |Δ log p|
    between the checkpoint's actor (mcore, TP=1) and transformers loading each export dir."""
    from megatron_papo.checkpoint.convert import as_saved, build_for_conversion, checkpoint_dtype, verify_mcore_vs_hf
    from megatron_papo.checkpoint.dist import load_checkpoint
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.parallel import init_distributed

    pg = init_distributed(ParallelConfig(tp=1, pp=1, device="cpu"))
    model = build_for_conversion(Path(hf_base), pg, checkpoint_dtype(Path(ckpt)))
    load_checkpoint(Path(ckpt), [as_saved(model, Path(ckpt))], optimizer=None, load_rng=False)
    return {d: verify_mcore_vs_hf(model, Path(d), pg) for d in exports}


def test_short_run_metrics_tensorboard_and_engine_gap(tmp_path):
    """Also: async dist-checkpoint save of the last step, and HF exports every step (checkpoint.hf_every=1) with
    keep_last=2, the last one checked against the saved actor by log-probs under transformers."""
    run = tmp_path / "run"
    rows = _train(run, extra=["total_steps=3", "checkpoint.save_every=0", "checkpoint.async_save=true",
                              "checkpoint.hf_every=1", "checkpoint.keep_last=2"])
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["rollout/logprob_gap"] <= 1e-4, r["rollout/logprob_gap"]  # engine == trainer log-probs after every sync
    assert steps[0]["check/actor_ref_gap"] == 0.0 and steps[0]["kl/ref"] == 0.0 and abs(steps[0]["ppo_kl"]) < 1e-7
    assert steps[1]["kl/ref"] > 0  # the actor moved away from the reference
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals and 0.0 <= evals[-1]["eval/accuracy"] <= 1.0 and 0.2 <= evals[-1]["eval/majority_baseline"] <= 0.35
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file() and (run / "logs" / "rank0.log").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_000003"
    assert sorted(p.name for p in (run / "hf").iterdir()) == ["step_000002", "step_000003"]  # keep_last, no .tmp_*
    ckpt, exports = run / "checkpoints" / "step_000003", [str(run / "hf" / "step_000002"), str(run / "hf" / "step_000003")]
    diff = run_distributed("tests.integration.test_train_e2e:verify_exports", 1,
                           {"ckpt": str(ckpt), "hf_base": str(run / "tiny_model"), "exports": exports})[0]
    assert diff[exports[1]] <= 1e-5, diff  # the step-3 export is the step-3 actor (fp32 CPU, the converter's atol)
    assert diff[exports[0]] > 1e-5, diff  # and the check tells it from the step before


FLEET_STEPS = ["total_steps=2", "checkpoint.save_every=0", "eval_at_end=false"]


def _check_every_engine(name: str, rows: list[dict]) -> None:
    assert [r["step"] for r in rows] == [1, 2], name
    for r in rows:  # every engine, every step (step 2 generates with the synced weights)
        gaps = [r[f"rollout/engine{k}/logprob_gap"] for k in (0, 1)]
        assert max(gaps) <= 1e-4 and r["rollout/logprob_gap"] == max(gaps), (name, r["step"], gaps)
    assert rows[1]["kl/ref"] > 0, name  # the actor moved, and both engines' log-probs moved with it


@pytest.fixture(scope="module")
def dp2_fleet_run(tmp_path_factory):
    """The reference layout: 2 processes at DP=2, 2 colocated engines."""
    rows = _train(tmp_path_factory.mktemp("dp2") / "run", nproc=2, extra=FLEET_STEPS)
    _check_every_engine("dp2", rows)
    return rows


@pytest.mark.distributed
@pytest.mark.parametrize("name,nproc,layout", [
    ("tp2", 2, ["parallel.tp=2"]),
    # PP2 and packed rows are `extended` (launch/run_tests.sh --full): PP training is checked against TP1 in
    # tests/distributed (test_model_training, test_mcore_cpu), the PP2 fleet's sync in test_rollout_fleet, packing in
    # test_model_packed / test_actor_batches
    pytest.param("pp2", 2, ["parallel.pp=2", "optim.micro_batch_size=32"], marks=pytest.mark.extended),
    # token-budget micro-batches of packed rows, at TP=2 (unpacked budgets: test_actor_batches)
    pytest.param("packed_tp2", 2, ["parallel.tp=2", "optim.micro_batch_tokens=1000", "optim.pack_sequences=true"],
                 marks=pytest.mark.extended),
    # 2 separate sglang.launch_server engines (sglang-router in front) fed through ONE weight-update group
    ("servers", 1, ["rollout.placement=separate", "rollout.mode=server", "rollout.transport=distributed",
                    "rollout.num_engines=2"]),
])
def test_two_engine_fleet_layouts_serve_new_weights_and_match_dp2_first_step(tmp_path, dp2_fleet_run, name, nproc, layout):
    """2-step runs, each with a 2-engine rollout fleet. Every engine's log-probs equal the trainer's after every sync;
    the fleets split the prompts alike and seed engine k alike, so the rollouts and with them the first-step metrics
    equal those of the DP=2 colocated reference."""
    rows = _train(tmp_path / name, nproc=nproc, extra=FLEET_STEPS + layout)
    _check_every_engine(name, rows)
    ref = dp2_fleet_run[0]
    for k in LAYOUT_FREE:
        assert abs(rows[0][k] - ref[k]) <= 1e-4 * max(1.0, abs(ref[k])), (name, k, rows[0][k], ref[k])


def test_rollout_only_then_train_from_saved_rollouts(tmp_path):
    rollouts = tmp_path / "rollouts"
    extra = ["total_steps=2", "checkpoint.save_every=0", "eval_at_end=false", f"rollouts_dir={rollouts}"]
    rec = _train(tmp_path / "rec", extra=extra + ["mode=rollout_only"])
    assert sorted(p.name for p in rollouts.iterdir()) == ["step_000001.pt", "step_000002.pt"]
    assert all("loss/pg" not in r for r in rec)  # no update in rollout-only mode
    # two PPO epochs: the ratio invariant holds on the first epoch's first mini-batch only (the second epoch starts
    # from updated weights), so the run must not stop there
    replay = _train(tmp_path / "replay", extra=extra + ["mode=train_from_rollouts", "optim.ppo_epochs=2"])
    assert [r["reward/mean"] for r in replay] == [r["reward/mean"] for r in rec]
    assert "loss/pg" in replay[0] and replay[0]["rollout/logprob_gap"] <= 1e-4


def test_bad_layout_exits_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "train", "--config", "tiny_cpu", f"run_dir={tmp_path}",
                           "parallel.tp=2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-papo:")]
    assert len(lines) == 1 and "tp(2)*pp(1)*cp(1)=2 does not divide world_size 1" in lines[0], proc.stderr[-2000:]


def _hf_tensors(run_dir: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    subprocess.run([sys.executable, "-m", "megatron_papo.cli", "convert", "mcore2hf", "--ckpt", str(run_dir), "--hf-base",
                    str(run_dir / "tiny_model"), "--out", str(out)], cwd=REPO, env=_env(), check=True, capture_output=True,
                   timeout=600)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_init_from_checkpoint_starts_actor_reference_and_engine_there(tmp_path):
    """A new run with checkpoint.init_from=<earlier run>: actor, reference and engine all start from its weights
    (step-1 invariants + engine gap), while the optimizer and step start fresh. With lr=0 its own checkpoint after
    one step must hold exactly the earlier run's weights."""
    import torch
    from safetensors.torch import load_file

    quiet = ["checkpoint.save_every=0", "eval_at_end=false"]
    _train(tmp_path / "a", extra=["total_steps=1", *quiet])
    rows = _train(tmp_path / "b", extra=["total_steps=1", *quiet, "optim.lr=0", f"checkpoint.init_from={tmp_path / 'a'}"])
    first = rows[0]
    assert first["step"] == 1 and first["rollout/logprob_gap"] <= 1e-4
    assert first["check/actor_ref_gap"] == 0.0 and first["kl/ref"] == 0.0  # the reference loaded it too
    a, b = _hf_tensors(tmp_path / "a", tmp_path / "a_hf"), _hf_tensors(tmp_path / "b", tmp_path / "b_hf")
    init = load_file(str(tmp_path / "b" / "tiny_model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in init)  # and those are not the fresh tiny weights
