"""Read back what wandb wrote offline: the records of ``<dir>/wandb/offline-run-*/run-<id>.wandb``.

The file is wandb's LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each with
a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of ``wandb_internal_pb2.Record`` protobufs.
Parsed here independently of wandb's writer, with wandb's own protobuf schema.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    """The serialized records of one ``.wandb`` file."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb datastore"
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            buf = chunk
        elif kind == _MIDDLE:
            buf += chunk
        elif kind == _LAST:
            yield buf + chunk


def read_run(path: Path) -> dict[str, Any]:
    """``{"run_id", "project", "config": {key: value}, "history": [{key: value, "_step": s}, ...]}``."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"config": {}, "history": []}
    for raw in raw_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"], out["project"] = rec.run.run_id, rec.run.project
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
    return out


def offline_runs(run_dir: Path) -> list[dict[str, Any]]:
    """Every offline run segment under ``run_dir/wandb``, oldest first."""
    files = sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    return [read_run(f) for f in files]
