#!/usr/bin/env bash
# The GPU suite in one command, for the first machine with a GPU (one GPU, no network, < 10 minutes):
#   bash tools/gpu_smoke.sh [extra pytest args]
# Runs tests/gpu (bf16/TE/FP8 PolicyModel steps, the SGLang GPU engine through the CUDA-IPC transport, memory
# release/resume, a 3-step CLI run with offloading + resume) and prints ONE line of JSON:
#   {"passed": N, "failed": N, "skipped": N, "seconds": S, "failures": [...], "measured": [...per-test numbers...]}
# Details: $OUT/gpu_smoke (junit XML, full log, measured.jsonl); OUT defaults to ./runs.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
DIR="${OUT:-$REPO/runs}/gpu_smoke"
mkdir -p "$DIR"
rm -f "$DIR/measured.jsonl"
export GPU_SMOKE_RESULTS="$DIR/measured.jsonl" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
"$PY" -m pytest tests/gpu -v -rA -s -p no:cacheprovider --junitxml="$DIR/junit.xml" "$@" > "$DIR/pytest.log" 2>&1
rc=$?
"$PY" - "$DIR" "$rc" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
d, rc, secs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = {"passed": 0, "failed": 0, "skipped": 0, "seconds": secs, "pytest_rc": rc, "failures": [], "measured": []}
try:
    for case in ET.parse(d / "junit.xml").getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"] += 1
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
except (OSError, ET.ParseError) as e:
    out["failures"].append({"test": "pytest", "message": f"no junit report ({e}); see {d / 'pytest.log'}"})
m = d / "measured.jsonl"
if m.exists():
    out["measured"] = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
print(json.dumps(out))
PYEOF
exit $rc
