#!/usr/bin/env bash
# Single-node training under torchrun (one process per GPU; on CPU set NPROC_PER_NODE, e.g. 2 with parallel.tp=2).
#
#   bash launch/torchrun_single.sh --config papo_g_3b,layouts/3b_8gpu model.path=/models/Qwen2.5-VL-3B-Instruct
#   NPROC_PER_NODE=2 bash launch/torchrun_single.sh --config tiny_cpu parallel.tp=2
#
# Every rank group of rollout.engine_tp ranks owns one SGLang engine on its devices (the rollout fleet): the CPU
# example above runs 2 engines; 8 GPUs with rollout.engine_tp=2 run 4.
#
# Environment: NPROC_PER_NODE or GPUS_PER_NODE [visible GPUs, else 1], MASTER_PORT [29500], LOG_DIR, PYTHON,
# STOP_GRACE (see torchrun_multinode.sh, which this runs with NNODES=1, NODE_RANK=0, MASTER_ADDR=127.0.0.1).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1
exec bash "$HERE/torchrun_multinode.sh" "$@"
