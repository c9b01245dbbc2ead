"""The multi-node path on one machine: two ``launch/torchrun_multinode.sh`` invocations (``--nnodes 2``, node rank 0
and 1, one process each) rendezvous on 127.0.0.1 and train ``tiny_cpu`` for 2 steps at TP=2 (the TP group spans the
two "nodes"); the trainer's checkpoint then converts to HF with ``--verify``. Also: the launcher stops only its own
process group on SIGTERM, and rejects a bad node layout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO, free_port

pytestmark = pytest.mark.distributed
SCRIPT = REPO / "launch" / "torchrun_multinode.sh"
TRAIN = ["--config", "tiny_cpu", "total_steps=2", "data.synthetic_train_size=64", "data.synthetic_test_size=16",
         "eval_at_end=false", "checkpoint.save_every=0", "parallel.tp=2", "logging.progress=false"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable,
            "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", **extra}


def _node(rank: int, port: int, tmp: Path, args: list[str], **extra: str) -> subprocess.Popen:
    env = _env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC_PER_NODE="1",
               LOG_DIR=str(tmp / "torchrun_logs"), **extra)
    out = open(tmp / f"node{rank}.out", "w")
    return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.engine
def test_two_node_rendezvous_trains_two_steps(tmp_path):
    run = tmp_path / "run"
    port = free_port()
    nodes = [_node(r, port, tmp_path, [*TRAIN, f"run_dir={run}"]) for r in (0, 1)]
    try:
        rcs = [p.wait(timeout=900) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=60)
    logs = {r: (tmp_path / f"node{r}.out").read_text(errors="replace") for r in (0, 1)}
    assert rcs == [0, 0], f"node exit codes {rcs}\n--- node0 ---\n{logs[0][-4000:]}\n--- node1 ---\n{logs[1][-4000:]}"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    for r in (0, 1):  # per-rank logs: torchrun's per node and the trainer's per global rank
        assert list((tmp_path / "torchrun_logs" / f"node{r}").rglob("stdout.log")), f"no torchrun log for node {r}"
        assert (run / "logs" / f"rank{r}.log").is_file()
    assert "world 2 = tp 2 x pp 1 x dp 1" in (run / "logs" / "rank0.log").read_text()
    conv = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "convert", "mcore2hf", "--ckpt", str(run), "--hf-base",
                           str(run / "tiny_model"), "--out", str(tmp_path / "hf"), "--verify"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0 and "OK" in conv.stdout, conv.stderr[-4000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_only_its_own_process_group(tmp_path):
    """Node 0 alone waits at the rendezvous; SIGTERM to the script ends torchrun and its workers, nothing else."""
    import psutil

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    node = _node(0, free_port(), tmp_path, [*TRAIN, f"run_dir={tmp_path / 'run'}"], RDZV_TIMEOUT="600", STOP_GRACE="20")
    try:
        script = psutil.Process(node.pid)
        deadline = time.time() + 120
        children: list[psutil.Process] = []
        while time.time() < deadline and not children:
            children = [c for c in script.children(recursive=True) if "torch.distributed.run" in " ".join(c.cmdline())]
            time.sleep(0.5)
        assert children, "torchrun did not start"
        time.sleep(2)
        group = script.children(recursive=True)
        assert all(os.getpgid(c.pid) != os.getpgid(node.pid) for c in group), "children share the script's group"
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=90) == 143
        gone, alive = psutil.wait_procs(group, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        assert _alive(bystander.pid), "the launcher stopped a process it did not start"
    finally:
        if node.poll() is None:
            node.kill()
        bystander.kill()
        bystander.wait()


def test_bad_layout_is_rejected(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--config", "tiny_cpu"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_env(NNODES="2", NODE_RANK="2", NPROC_PER_NODE="1", LOG_DIR=str(tmp_path)))
    assert proc.returncode == 2 and "NODE_RANK=2 must be < NNODES=2" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_env(NNODES="two", LOG_DIR=str(tmp_path)))
    assert proc.returncode == 2 and "NNODES='two'" in proc.stderr
