"""Converter pieces without process groups: shard packing and writing, asset copying, and one-line CLI errors."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_papo.checkpoint.convert import ConvertError, HFShardWriter, copy_hf_assets, plan_shards, resolve_checkpoint
from tests.harness import REPO

TOOL = REPO / "tools" / "convert_checkpoint.py"


def _tool():
    return runpy.run_path(str(TOOL), run_name="convert_tool")


def test_parse_size():
    parse = _tool()["parse_size"]
    assert parse("5GB") == 5 * 10**9 and parse("500MiB") == 500 * 2**20 and parse("1048576") == 2**20
    assert parse("2kb") == 2000 and parse("1.5GiB") == int(1.5 * 2**30)


def test_plan_shards_greedy_in_order():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]  # an oversize tensor gets a shard of its own
    assert plan_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]


def test_writer_shards_and_index(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.arange(i * 10, i * 10 + 6, dtype=torch.float32).reshape(2, 3) for i in range(5)}
    sizes = [(k, v.numel() * 4) for k, v in tensors.items()]
    w = HFShardWriter(tmp_path, sizes, max_shard_bytes=50)
    for k, v in tensors.items():
        w.add(k, v)
    files = w.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 24
    back = {}
    for f in files:
        part = load_file(str(tmp_path / f))
        assert all(index["weight_map"][k] == f for k in part)
        back.update(part)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_writer_single_file_and_order_checks(tmp_path):
    w = HFShardWriter(tmp_path, [("a", 4), ("b", 4)], max_shard_bytes=10**9)
    with pytest.raises(ConvertError, match="unexpected tensor"):
        w.add("zz", torch.zeros(1))
    w.add("a", torch.zeros(1))
    with pytest.raises(ConvertError, match="missing"):
        w.close()
    w.add("b", torch.ones(1))
    assert w.close() == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    w2 = HFShardWriter(tmp_path / "x", [("a", 4), ("b", 4)], max_shard_bytes=4)
    with pytest.raises(ConvertError, match="out of order"):
        w2.add("b", torch.zeros(1))


def test_copy_assets_skips_weights_and_sets_dtype(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_hf_assets(Path(tiny_model_dir), out, torch.bfloat16)
    assert "config.json" in copied and "tokenizer.json" in copied and "chat_template.jinja" in copied
    assert not list(out.glob("*.safetensors"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(ConvertError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ConvertError, match="neither a dist-checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "step_000001").mkdir()
    (tmp_path / "step_000001" / "metadata.json").write_text("{}")
    with pytest.raises(ConvertError, match="incomplete checkpoint"):
        resolve_checkpoint(tmp_path / "step_000001")


def _one_line_error(rc: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err
    assert lines and lines[-1].startswith("convert: error:") and needle in lines[-1], err
    assert "Traceback" not in err


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    main = _tool()["main"]
    cases = [
        (["mcore2hf", "--ckpt", str(tmp_path / "missing"), "--hf-base", str(tiny_model_dir), "--out", str(tmp_path / "o")],
         "does not exist"),
        (["mcore2hf", "--ckpt", str(tmp_path), "--hf-base", str(tmp_path), "--out", str(tmp_path / "o")], "neither"),
        (["hf2mcore", "--hf", str(tmp_path), "--out", str(tmp_path / "o")], "no config.json"),
        (["hf2mcore", "--hf", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--tp", "2"], "needs 2 processes"),
        (["hf2mcore", "--hf", str(tiny_model_dir), "--out", str(tiny_model_dir)], "not empty"),
    ]
    for argv, needle in cases:
        rc = main(argv)
        _one_line_error(rc, capsys.readouterr().err, needle)


def test_cli_delegation_error(tmp_path):
    """Through ``megatron-papo convert`` (cli.py runs the tool by path)."""
    proc = subprocess.run([sys.executable, "-m", "megatron_papo.cli", "convert", "hf2mcore", "--hf", str(tmp_path),
                           "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=300)
    _one_line_error(proc.returncode, proc.stderr, "no config.json")
