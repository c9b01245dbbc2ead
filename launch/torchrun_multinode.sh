#!/usr/bin/env bash
# Multi-node training under torchrun: run this once on every node (Slurm: launch/slurm.sbatch; Kubernetes: launch/k8s/).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     bash launch/torchrun_multinode.sh --config papo_g_7b,layouts/7b_8gpu model.path=/models/Qwen2.5-VL-7B-Instruct
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   NPROC_PER_NODE or GPUS_PER_NODE [visible GPUs, else 1]   processes on this node
#   LOG_DIR [<repo>/runs/torchrun_logs]   per-rank stdout/stderr: LOG_DIR/node<NODE_RANK>/<run id>/attempt_0/<local rank>/
#   PYTHON [<repo>/.venv/bin/python if present, else python3]   RDZV_TIMEOUT [900] seconds to wait for all nodes
# Arguments go to `megatron-papo train` (--config RECIPE[,RECIPE] and key=value overrides; --config defaults to tiny_cpu).
# The script starts torchrun in its own process group. On SIGTERM/SIGUSR1 (preemption: Slurm --signal, Kubernetes
# termination) and SIGINT/SIGHUP it passes the signal to torchrun, which forwards it to every trainer rank (they
# finish the step, save a checkpoint and exit 128+signal: checkpoint.preempt_signals) and SIGKILLs ranks still
# running after STOP_GRACE [330] seconds (keep it above checkpoint.preempt_timeout_s [300]); then anything left in
# the group is killed. It never kills processes by name.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
STOP_GRACE="${STOP_GRACE:-330}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-900}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
NPROC="${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}"
if [[ -z "$NPROC" ]]; then
  NPROC="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)"
fi
for var in NNODES NODE_RANK MASTER_PORT NPROC STOP_GRACE RDZV_TIMEOUT; do
  if ! [[ "${!var}" =~ ^[0-9]+$ ]]; then
    echo "torchrun_multinode: $var='${!var}' is not a non-negative integer" >&2
    exit 2
  fi
done
if (( NODE_RANK >= NNODES )); then
  echo "torchrun_multinode: NODE_RANK=$NODE_RANK must be < NNODES=$NNODES" >&2
  exit 2
fi
LOG_DIR="${LOG_DIR:-$REPO/runs/torchrun_logs}/node${NODE_RANK}"
mkdir -p "$LOG_DIR"

args=("$@")
has_config=0
for a in "${args[@]}"; do
  if [[ "$a" == --config || "$a" == --config=* ]]; then has_config=1; fi
done
if (( has_config == 0 )); then args=(--config "${CONFIG:-tiny_cpu}" "${args[@]}"); fi

SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun forwards these to the ranks
cmd=("$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  --rdzv-conf "timeout=$RDZV_TIMEOUT"
  --signals-to-handle "$SIGNALS" --shutdown-timeout "$STOP_GRACE"
  --log-dir "$LOG_DIR" --redirects 3 --tee 3
  -m megatron_papo.cli train "${args[@]}")
echo "torchrun_multinode: node $NODE_RANK/$NNODES, $NPROC proc(s), master $MASTER_ADDR:$MASTER_PORT, logs $LOG_DIR" >&2

child=""
# shellcheck disable=SC2317  # invoked through trap
# shellcheck disable=SC2329  # invoked by the trap below
stop() {
  local sig="$1" code="$2"
  trap - INT TERM HUP USR1
  [[ -n "$child" ]] || exit "$code"
  echo "torchrun_multinode: got SIG$sig, passing it to torchrun (pid $child; ranks save and exit)" >&2
  kill "-$sig" "$child" 2>/dev/null || true
  for _ in $(seq $((STOP_GRACE + 15))); do
    kill -0 "$child" 2>/dev/null || break
    sleep 1
  done
  kill -KILL -- "-$child" 2>/dev/null || true
  wait "$child" 2>/dev/null || true
  exit "$code"
}
trap 'stop INT 130' INT
trap 'stop TERM 143' TERM
trap 'stop HUP 129' HUP
trap 'stop USR1 138' USR1

cd "$REPO"
set -m  # the child gets its own process group, so we can signal exactly it and its descendants
"${cmd[@]}" &
child=$!
set +m

rc=0
wait "$child" || rc=$?
exit "$rc"
