"""Launch scripts: ``bash -n`` and shellcheck (when installed: ``apt-get install shellcheck``) on every script, and
the Kubernetes example's wiring (headless Service ↔ Indexed Job, node rank, script path inside the image).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*(REPO / "launch").glob("*.sh"), REPO / "launch" / "slurm.sbatch"])
OURS = ["torchrun_single.sh", "torchrun_multinode.sh", "slurm.sbatch"]


def test_our_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert set(OURS) <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", OURS)
def test_shellcheck(name):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck); bash -n still runs")
    proc = subprocess.run([exe, "-s", "bash", str(REPO / "launch" / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", OURS)
def test_no_kill_by_name(name):
    text = (REPO / "launch" / name).read_text()
    assert not re.search(r"\b(pkill|killall)\b", text), f"{name} must stop only its own processes"


def test_multinode_reads_the_cluster_environment():
    text = (REPO / "launch" / "torchrun_multinode.sh").read_text()
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "NPROC_PER_NODE"):
        assert f"${{{var}" in text, f"torchrun_multinode.sh does not read {var}"
    for flag in ("--log-dir", "--redirects", "--tee", "-m megatron_papo.cli train"):
        assert flag in text
    sbatch = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "scontrol show hostnames" in sbatch and "SLURM_NODEID" in sbatch and "--ntasks-per-node=1" in sbatch


def test_kubernetes_example_wiring():
    docs = list(yaml.safe_load_all((REPO / "launch" / "k8s" / "megatron-papo.yaml").read_text()))
    svc = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    assert svc["spec"]["clusterIP"] == "None"
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert int(env["NNODES"]["value"]) == spec["completions"]
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod["securityContext"]["runAsUser"] != 0
    # the command runs the launcher from where the Dockerfile installs the project
    dockerfile = (REPO / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR\s+(/opt/\S+)", dockerfile, flags=re.M).group(1)
    assert c["command"][-1] == f"{workdir}/launch/torchrun_multinode.sh"
    assert re.search(r"^COPY launch \./launch", dockerfile, flags=re.M)


def test_gpu_smoke_script_prints_one_json_summary(tmp_path):
    """tools/gpu_smoke.sh lints clean and, on this CPU machine, runs tests/gpu to all-skipped with one JSON line."""
    import json
    import os

    script = REPO / "tools" / "gpu_smoke.sh"
    exe = shutil.which("shellcheck")
    if exe is not None:
        lint = subprocess.run([exe, "-s", "bash", str(script)], capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is the CPU behaviour; on a GPU machine run the script itself")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    summary = json.loads(lines[0])
    assert summary["failed"] == 0 and summary["passed"] == 0 and summary["skipped"] >= 5, summary
    assert (tmp_path / "gpu_smoke" / "junit.xml").is_file()


def test_preemption_signal_and_grace_periods_fit_the_save_timeout():
    """Slurm asks for SIGUSR1 early, Kubernetes waits long enough, the launcher passes the signal to torchrun (which
    forwards it to the ranks) and waits longer than the trainer's preemption timeout."""
    from megatron_papo.config.checkpoint import CheckpointConfig

    timeout = CheckpointConfig().preempt_timeout_s
    launcher = (REPO / "launch" / "torchrun_multinode.sh").read_text()
    grace = int(re.search(r'STOP_GRACE="\$\{STOP_GRACE:-(\d+)\}"', launcher).group(1))
    assert grace > timeout and 'SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"' in launcher
    assert '--signals-to-handle "$SIGNALS" --shutdown-timeout "$STOP_GRACE"' in launcher and "trap 'stop USR1 138' USR1" in launcher
    early = int(re.search(r"^#SBATCH --signal=USR1@(\d+)$", (REPO / "launch" / "slurm.sbatch").read_text(), re.M).group(1))
    assert early > grace and {"SIGTERM", "SIGUSR1"} <= set(CheckpointConfig().preempt_signals)
    docs = list(yaml.safe_load_all((REPO / "launch" / "k8s" / "megatron-papo.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert pod["terminationGracePeriodSeconds"] > int(env["STOP_GRACE"]) > timeout
