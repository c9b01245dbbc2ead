"""Run a function under torchrun with N gloo processes and collect each rank's result.

    results = run_distributed("tests.distributed.workers_x:check_tp", nproc=2, kwargs={"tp": 2})

The target ``module:function`` is called on every rank as ``fn(**kwargs)`` after
``torch.distributed`` is initialised (gloo); its return value must be JSON-serialisable and is
returned as a list indexed by rank. On failure every rank's log is included in the exception.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An unused localhost TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedRunError(RuntimeError):
    """A torchrun job failed; the message carries every rank's log."""


def run_torchrun(argv: list[str], nproc: int, *, timeout: float = 300, env: Optional[dict] = None,
                 nnodes: int = 1) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N ... argv`` with logs captured per rank."""
    log_dir = Path(tempfile.mkdtemp(prefix="tr_logs_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", f"--log-dir={log_dir}", "--redirects=3",
           "--tee=0", *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
                **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DistributedRunError(f"torchrun timed out after {timeout}s\n{_collect_logs(log_dir)}") from e
    if proc.returncode != 0:
        raise DistributedRunError(
            f"torchrun exited {proc.returncode}\n--- launcher stderr ---\n{proc.stderr[-4000:]}\n{_collect_logs(log_dir)}")
    return proc


def run_probe(source: str, cwd: Path, *, timeout: float = 300) -> list[str]:
    """Run ``source`` as a script in a fresh interpreter (``cwd``, the repo on PYTHONPATH) and return its stdout
    lines; a non-zero exit fails the calling test with the script's stderr. For checks of process-global patches
    (module-level state of SGLang, start methods) that must not leak into the test process."""
    script = cwd / "probe.py"
    script.write_text(source)
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.splitlines()


def _collect_logs(log_dir: Path) -> str:
    parts = []
    for f in sorted(log_dir.rglob("*.log")):
        text = f.read_text(errors="replace")
        parts.append(f"--- {f.relative_to(log_dir)} ---\n{text[-6000:]}")
    return "\n".join(parts) or "(no rank logs)"


def run_distributed(target: str, nproc: int, kwargs: Optional[dict[str, Any]] = None, *, timeout: float = 300,
                    env: Optional[dict] = None) -> list[Any]:
    """Call ``module:function(**kwargs)`` on ``nproc`` gloo ranks; return the per-rank results."""
    out_dir = Path(tempfile.mkdtemp(prefix="tr_out_"))
    spec = json.dumps({"target": target, "kwargs": kwargs or {}, "out_dir": str(out_dir)})
    run_torchrun([str(REPO / "tests" / "_dist_worker.py"), spec], nproc, timeout=timeout, env=env)
    results = []
    for r in range(nproc):
        path = out_dir / f"rank{r}.json"
        if not path.exists():
            raise DistributedRunError(f"rank {r} wrote no result to {path}")
        results.append(json.loads(path.read_text()))
    return results


def dcp_tensors(step_dir: Path, tmp: Path) -> dict[str, Any]:
    """Every tensor of a dist-checkpoint (model and optimizer state), read back through torch DCP, by path."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}_{step_dir.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(out))
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str = "") -> None:
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}/{k}")

    walk(torch.load(out, weights_only=False))
    return flat
