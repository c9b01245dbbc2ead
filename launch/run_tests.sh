#!/usr/bin/env bash
# The README's test command: bootstrap the venv if needed, lint, then run the whole test suite
# (unit, distributed (gloo/torchrun), integration incl. real SGLang engine and end-to-end runs;
# GPU tests skip themselves without CUDA). Extra arguments go to pytest. `--full` (first argument) also runs the
# `extended` tests: more parallel layouts of capabilities the default run already covers end to end (~25 min more).
set -euo pipefail
if [[ "${1:-}" == "--full" ]]; then
  export MEGATRON_PAPO_FULL_TESTS=1
  shift
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/launch/setup_env.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PATH="$REPO/.venv/bin:$PATH"  # the venv's shellcheck and hadolint for the launch-script and Dockerfile lints
.venv/bin/ruff check .
# Test files run on MEGATRON_PAPO_TEST_WORKERS pytest-xdist workers (default 2; 0 = in this process). A file stays
# on one worker (--dist loadfile), so a module's shared engine is started once and its tests keep their order. Most
# end-to-end tests leave a core idle part of the time (engine start-up, one trainer rank waiting on an engine), which
# the other worker fills.
WORKERS="${MEGATRON_PAPO_TEST_WORKERS:-2}"
XDIST=()
if [[ "$WORKERS" != "0" ]]; then
  XDIST=(-n "$WORKERS" --dist loadfile)
fi
exec .venv/bin/python -m pytest "${XDIST[@]}" "$@"
