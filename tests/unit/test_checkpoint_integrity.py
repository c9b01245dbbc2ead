"""Checkpoint integrity without process groups: manifest, validation, fallback, stale tmp dirs, pruning, and
the refusal to save non-finite weights (checkpoint/dist.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from megatron_papo.checkpoint.dist import (
    MANIFEST,
    _prune,
    clean_stale,
    find_resumable,
    save_checkpoint,
    validate_checkpoint,
    write_manifest,
)
from megatron_papo.errors import CheckpointError


def _ckpt(root, step, manifest=True, big=b"x" * 5000):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    (d / "__0_0.distcp").write_bytes(big)
    (d / "sub").mkdir()
    (d / "sub" / "common.pt").write_bytes(b"abc" * 10)
    if manifest:
        write_manifest(d, step)
    return d


def _mark(root, d):
    (root / "latest").write_text(d.name)


def test_manifest_lists_every_file_with_size_and_crc(tmp_path):
    d = _ckpt(tmp_path, 2)
    m = json.loads((d / MANIFEST).read_text())
    assert m["step"] == 2 and sorted(m["files"]) == ["__0_0.distcp", "sub/common.pt", "trainer_state.json"]
    assert m["files"]["__0_0.distcp"]["size"] == 5000 and len(m["files"]["sub/common.pt"]["crc32"]) == 8
    assert validate_checkpoint(d) is None


@pytest.mark.parametrize("damage, expect", [
    (lambda d: (d / "__0_0.distcp").write_bytes(b"x" * 2500), "__0_0.distcp has 2500 bytes, the manifest says 5000"),
    (lambda d: (d / "sub" / "common.pt").write_bytes(b"abd" * 10), "common.pt fails its CRC32 check"),
    (lambda d: (d / "sub" / "common.pt").unlink(), "common.pt is missing"),
    (lambda d: (d / "trainer_state.json").write_text("{"), "trainer_state.json unreadable"),
    (lambda d: (d / MANIFEST).write_text("[]"), "manifest.json unreadable"),
])
def test_damaged_checkpoint_fails_validation_naming_the_file(tmp_path, damage, expect):
    d = _ckpt(tmp_path, 2)
    damage(d)
    reason = validate_checkpoint(d)
    assert reason is not None and expect in reason and str(d) in reason


def test_checksum_mode_catches_same_size_corruption_of_large_files(tmp_path):
    d = _ckpt(tmp_path, 1, manifest=False)
    write_manifest(d, 1, verify="checksum")
    (d / "__0_0.distcp").write_bytes(b"y" * 5000)
    assert "__0_0.distcp fails its CRC32 check" in validate_checkpoint(d)


def test_resume_falls_back_past_broken_newest_and_repoints_latest(tmp_path, caplog):
    good = _ckpt(tmp_path, 2)
    bad = _ckpt(tmp_path, 4)
    (bad / "__0_0.distcp").write_bytes(b"x" * 10)
    _mark(tmp_path, bad)
    with caplog.at_level(logging.WARNING):
        assert find_resumable(tmp_path) == good
    text = caplog.text
    assert f"checkpoint {bad} is unusable: {bad / '__0_0.distcp'} has 10 bytes" in text and "step_000002 instead" in text
    assert (tmp_path / "latest").read_text() == "step_000002"


def test_resume_without_checkpoints_or_with_only_broken_ones(tmp_path):
    assert find_resumable(tmp_path / "none") is None
    bad = _ckpt(tmp_path, 3)
    (bad / "sub" / "common.pt").unlink()
    _mark(tmp_path, bad)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .* \(step_000003: .*common.pt is missing.*resume=never"):
        find_resumable(tmp_path)


def test_checkpoint_without_manifest_is_accepted_and_latest_is_preferred(tmp_path):
    old = _ckpt(tmp_path, 1, manifest=False)
    _ckpt(tmp_path, 5)
    _mark(tmp_path, old)
    assert find_resumable(tmp_path) == old  # 'latest' names a complete (pre-manifest) checkpoint


def test_stale_tmp_dirs_are_removed(tmp_path):
    (tmp_path / ".tmp_step_000007" / "x").mkdir(parents=True)
    keep = _ckpt(tmp_path, 6)
    assert [p.name for p in clean_stale(tmp_path)] == [".tmp_step_000007"]
    assert not (tmp_path / ".tmp_step_000007").exists() and keep.exists()
    assert clean_stale(tmp_path / "missing") == []


def test_prune_keeps_the_newest_valid_and_latest(tmp_path):
    dirs = [_ckpt(tmp_path, s) for s in (1, 2, 3, 4)]
    for d in dirs[2:]:
        (d / "__0_0.distcp").write_bytes(b"")  # the two newest are broken
    _mark(tmp_path, dirs[3])
    _prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000004"]


def test_non_finite_weights_are_never_saved(tmp_path, caplog):
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 1] = float("nan")
    with caplog.at_level(logging.ERROR):
        assert save_checkpoint(tmp_path, 3, [lin]) is None
    assert "NOT saving step 3" in caplog.text and not any(tmp_path.iterdir())
