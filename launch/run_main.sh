#!/usr/bin/env bash
# The README's main job: bootstrap the venv if needed, then a real PAPO training run of the
# embedded tiny Qwen2.5-VL on the synthetic vision task, on CPU (recipe launch/configs/tiny_cpu.yaml).
# Extra arguments are config overrides, e.g.  bash launch/run_main.sh seed=2 run_dir=runs/seed2
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/launch/setup_env.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/megatron-papo train --config tiny_cpu "$@"
