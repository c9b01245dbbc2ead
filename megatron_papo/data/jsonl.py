"""Read a JSON-lines file row by row, so that one undecodable or malformed line is named (file, row, line)
and can be skipped instead of failing the whole load inside ``datasets``.

:func:`read_jsonl` returns the rows (``None`` for a bad line, keeping row numbers = positions among the
non-blank lines, the uids ``datasets.Dataset.from_json`` would give) and the bad rows with their reasons.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def read_jsonl(path: str | Path) -> tuple[list[Optional[dict[str, Any]]], dict[int, tuple[str, str]]]:
    """``(rows, bad)``: ``bad[row] = (kind, message)`` with kind ``bad_text`` (not UTF-8) or ``bad_json``."""
    rows: list[Optional[dict[str, Any]]] = []
    bad: dict[int, tuple[str, str]] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            i = len(rows)
            rows.append(None)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad[i] = ("bad_text", f"row {i} (line {lineno}): text is not UTF-8 (byte 0x{raw[e.start]:02x} at "
                          f"column {e.start + 1})")
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                bad[i] = ("bad_json", f"row {i} (line {lineno}): not valid JSON ({e})")
                continue
            if not isinstance(obj, dict):
                bad[i] = ("bad_json", f"row {i} (line {lineno}): a JSON {type(obj).__name__}, expected an object")
                continue
            rows[i] = obj
    return rows, bad


def has_bad_lines(path: str | Path) -> bool:
    """True when some non-blank line of ``path`` is not UTF-8 or not a JSON object (a quick pre-check)."""
    return bool(read_jsonl(path)[1])
