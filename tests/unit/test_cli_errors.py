"""One-line CLI errors (cli.py): config, data, checkpoint and divergence errors, ``--debug``, numeric knobs."""

from __future__ import annotations

import pytest

from megatron_papo import cli
from megatron_papo.config import ConfigError, load_config
from megatron_papo.errors import CheckpointError, DataError, DivergedError


def _lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("override, expect", [
    ("optim.lr=-1e-3", "optim.lr=-0.001 is out of range; expected a value in [0.0, inf)"),
    ("optim.lr=nan", "optim.lr=nan is not a finite number"),
    ("optim.lr=.inf", "optim.lr=inf is not a finite number"),
    ("optim.adam_beta2=1.0", "optim.adam_beta2=1.0 is out of range; expected a value in [0.0, 1.0)"),
    ("rollout.top_p=0", "rollout.top_p=0.0 is out of range; expected a value in (0.0, 1.0]"),
    ("algo.kl_prcp_coef=-1", "algo.kl_prcp_coef"),
    ("optim.max_skipped_steps=-2", "optim.max_skipped_steps=-2 is out of range"),
    ("data.mask_size=0", "data.mask_size: got 0"),
    ("checkpoint.preempt_timeout_s=0", "checkpoint.preempt_timeout_s=0.0 is out of range"),
])
def test_numeric_knobs_are_checked_before_anything_starts(capsys, override, expect):
    assert cli.main(["config", "--config", "tiny_cpu", override]) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("megatron-papo: config error: ") and expect in lines[0], lines


def test_every_recipe_passes_the_numeric_checks():
    from megatron_papo.config.schema import RECIPE_DIR

    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        load_config(path.stem)


@pytest.mark.parametrize("exc, kind, code", [
    (DataError("data 'x.jsonl' row 3: bad\nsecond line"), "data error", 2),
    (CheckpointError("checkpoint /c/step_000004 could not be loaded"), "checkpoint error", 2),
    (ConfigError("model.path: /m/config.json is not readable JSON"), "config error", 2),
    (DivergedError("step 9: 3 consecutive steps had a non-finite loss"), "training stopped", 3),
])
def test_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, exc, kind, code):
    def boom(*_):
        raise exc

    monkeypatch.setattr("megatron_papo.train.main", boom)
    monkeypatch.delenv("MEGATRON_PAPO_DEBUG", raising=False)
    assert cli.main(["train", "--config", "tiny_cpu"]) == code
    lines = _lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"megatron-papo: {kind}: ") and "Traceback" not in lines[0], lines
    assert cli.main(["train", "--debug"]) == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(f"megatron-papo: {kind}")
    monkeypatch.setenv("MEGATRON_PAPO_DEBUG", "1")
    assert cli.main(["train"]) == code and "Traceback" in capsys.readouterr().err


def test_corrupt_config_json_under_model_path_is_named(tmp_path):
    from megatron_papo.train import prepare_model_dir

    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2_5_VLForConditionalGeneration"],')
    cfg = load_config("tiny_cpu", [f"model.path={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"model.path: {tmp_path}/config.json is not readable JSON \(JSONDecodeError"):
        prepare_model_dir(cfg, rank=0)
