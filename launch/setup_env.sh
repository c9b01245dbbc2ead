#!/usr/bin/env bash
# Build (or refresh) the project's virtual environment from nothing on a CPU-only Python 3.11 machine.
# Idempotent: a complete venv is detected by a stamp file holding the hash of the inputs and is left alone.
#   VENV=path (default: <repo>/.venv)   PYTHON=python3.11 (default: python3)
# No step downloads model weights or data: only packages from the package registries.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
REQ="$REPO/launch/requirements-cpu.txt"
STAMP="$VENV/.megatron_papo_env"
want="$(cat "$REQ" "$REPO/setup.py" "$REPO/launch/setup_env.sh" $(ls "$REPO"/launch/install_sglang_cpu_shim.* 2>/dev/null) | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
t0=$(date +%s)
echo "[setup_env] building $VENV (this takes ~3-4 minutes on a fresh machine)" >&2
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip's file:// index mirrors on these machines print one warning per package; keep the log readable.
"${PIP[@]}" install -r "$REQ" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -c "import torch, torchvision, transformers, megatron.core, sglang" 2>/dev/null \
  || { echo "[setup_env] pip install of $REQ failed" >&2; exit 1; }
# sgl-flash-mla raises OSError (not ImportError) on import without a GPU driver, which breaks
# megatron-core's optional-import guards: remove it on CPU machines (GPU containers keep it).
if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  "${PIP[@]}" uninstall -y sgl-flash-mla 2>&1 | grep -v "^WARNING" >&2 || true
fi
"${PIP[@]}" install --no-deps -e "$REPO" 2>&1 | grep -v "^WARNING: Location" >&2 || true
# SGLang's CPU engine needs a CPU stand-in for sgl_kernel (active only with SGLANG_USE_CPU_ENGINE=1).
if [[ -f "$REPO/launch/install_sglang_cpu_shim.py" ]]; then
  "$VENV/bin/python" "$REPO/launch/install_sglang_cpu_shim.py"
fi
echo "$want" > "$STAMP"
echo "[setup_env] done in $(( $(date +%s) - t0 ))s; venv size $(du -sh "$VENV" | cut -f1)" >&2
