#!/usr/bin/env bash
# The README's test command: bootstrap the venv if needed, lint, then run the whole test suite
# (unit, distributed (gloo/torchrun), integration incl. real SGLang engine and end-to-end runs;
# GPU tests skip themselves without CUDA). Extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/launch/setup_env.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PATH="$REPO/.venv/bin:$PATH"  # shellcheck / hadolint from the venv for the launch-script and Dockerfile lints
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
