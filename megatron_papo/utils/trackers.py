"""Experiment trackers behind ``logging.backends``: wandb and mlflow (optional packages, imported on use).

- **wandb**: ``wandb.init(dir=<run_dir>, mode=offline|online)``; offline runs are files under
  ``<run_dir>/wandb/offline-run-*`` (upload with ``wandb sync``). The config holds the resolved config
  with ``run_dir`` as an absolute path.
- **mlflow**: a run in experiment ``logging.project`` of ``logging.mlflow_tracking_uri`` (default: the
  local file store ``<run_dir>/mlruns``); params = the flattened resolved config, tag ``run_dir``,
  artifact ``config.json``.

Both log every finite number of a metrics record at its step. The tracker run ids live in
``<run_dir>/trackers.json``: when the training run resumes from a checkpoint (``checkpoint.resume=auto``)
the same tracker runs continue (wandb ``resume="allow"`` with the saved id — offline, each segment is
its own ``offline-run-*`` directory with that id, and ``wandb sync`` appends them to one run; mlflow
reopens the saved run id); a fresh start opens new ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from megatron_papo.config.base import ConfigError
from megatron_papo.utils.logging import get_logger
from megatron_papo.utils.metrics import numeric

log = get_logger("trackers")
IDS_FILE = "trackers.json"
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_backends(backends: list[str]) -> None:
    """Fail early (one line) when a requested tracker's package is not installed."""
    for name in backends:
        pkg = _PACKAGES.get(name)
        if pkg and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"logging.backends includes {name} but the '{pkg}' package is not installed; "
                              f"pip install 'megatron_papo[trackers]' or drop {name} from logging.backends")


def _load_ids(run_dir: Path) -> dict[str, Any]:
    path = run_dir / IDS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _save_id(run_dir: Path, name: str, value: dict[str, Any]) -> None:
    ids = _load_ids(run_dir)
    ids[name] = value
    tmp = run_dir / f".{IDS_FILE}.tmp"
    tmp.write_text(json.dumps(ids, indent=1))
    os.replace(tmp, run_dir / IDS_FILE)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def open_tracker(name: str, run_dir: Path, *, resume_step: Optional[int], config: dict[str, Any], logging_cfg: Any) -> Any:
    """A started tracker sink (``wandb`` | ``mlflow``) for this run dir."""
    run_dir = Path(run_dir).resolve()
    config = {**config, "run_dir": str(run_dir)}
    run_name = getattr(logging_cfg, "run_name", None) or run_dir.name
    project = getattr(logging_cfg, "project", "megatron_papo")
    prev = _load_ids(run_dir).get(name) if resume_step is not None else None
    if name == "wandb":
        return WandbSink(run_dir, project=project, run_name=run_name, config=config, prev=prev,
                         mode=getattr(logging_cfg, "wandb_mode", None))
    if name == "mlflow":
        return MlflowSink(run_dir, project=project, run_name=run_name, config=config, prev=prev, resume_step=resume_step,
                          tracking_uri=getattr(logging_cfg, "mlflow_tracking_uri", None))
    raise ConfigError(f"logging.backends: unknown tracker '{name}'; known: wandb, mlflow")


class WandbSink:
    """A wandb run (offline unless ``mode``/``WANDB_MODE`` say online)."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any],
                 prev: Optional[dict[str, Any]], mode: Optional[str]) -> None:
        import wandb

        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        run_id = prev["id"] if prev else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
                              config=config, settings=wandb.Settings(console="off", quiet=True))
        self.run_id = run_id
        _save_id(run_dir, "wandb", {"id": run_id, "project": project})
        log.info("wandb run %s (%s)%s", run_id, mode, " resumed" if prev else "")

    def write(self, step: int, rec: dict[str, Any]) -> None:
        vals = numeric(rec)
        if vals:
            self.run.log(vals, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


_MLFLOW_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def mlflow_key(key: str) -> str:
    """A metric/param name mlflow accepts (letters, digits, ``_-. /:``; anything else -> ``_``)."""
    return _MLFLOW_KEY_BAD.sub("_", key)


class MlflowSink:
    """An mlflow run through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any],
                 prev: Optional[dict[str, Any]], resume_step: Optional[int], tracking_uri: Optional[str]) -> None:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # mlflow 3 keeps the file store in maintenance mode behind this opt-in; it is the offline store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        params = {mlflow_key(k): str(v)[:6000] for k, v in flatten(config).items()}
        if prev and prev.get("tracking_uri") == uri:
            self.run_id = prev["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            missing = {k: v for k, v in params.items() if k not in logged}
            if changed:  # mlflow params are immutable: the resumed config goes in as an artifact
                log.warning("mlflow: config changed on resume (%s); see artifact config_step%d.json",
                            ", ".join(changed), resume_step or 0)
                self.client.log_dict(self.run_id, config, f"config_step{resume_step or 0}.json")
            self._log_params(missing)
        else:
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project)
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"run_dir": str(run_dir)}).info.run_id
            self._log_params(params)
            self.client.log_dict(self.run_id, config, "config.json")
            _save_id(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri, "experiment": project})
        log.info("mlflow run %s at %s%s", self.run_id, uri, " resumed" if prev else "")

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # mlflow's per-batch param limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def write(self, step: int, rec: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), v, ts, step) for k, v in numeric(rec).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def close(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status="FINISHED")
            self.client = None
