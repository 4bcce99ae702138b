#!/usr/bin/env bash
# Plain torchrun, no accelerate: run this on every node (same MASTER_ADDR/MASTER_PORT/NNODES,
# NODE_RANK 0 on the MASTER_ADDR node, 1..NNODES-1 on the others).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun_example.sh [trainer args...]
#   NPROC_PER_NODE=2 bash launch/torchrun_example.sh --config configs/train/tiny_cpu.yaml   # 1 CPU node
#   DRY_RUN=1 ... prints the command instead
#
# The trainer (launch/train.py) is told the strategy with --parallel (under accelerate launch it
# reads it from the accelerate config); launch/examples/sharded_htmuon.py works the same way
# (SCRIPT=launch/examples/sharded_htmuon.py, with --backend fsdp2 instead of --parallel).
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  if [ "${NPROC_PER_NODE:-0}" -lt 1 ]; then
    echo "torchrun_example.sh: no GPU found: set NPROC_PER_NODE (processes on this node)" >&2
    exit 2
  fi
fi
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
SCRIPT=${SCRIPT:-launch/train.py}
if [ "$SCRIPT" = launch/train.py ]; then
  default_args=(--config configs/train/c4_reference.yaml --model 1b --optimizer htmuon_interval --parallel fsdp2)
else
  default_args=()
fi
if [ "$#" -gt 0 ]; then default_args=(); fi

cmd=("$TORCHRUN" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$SCRIPT" "${default_args[@]}" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${cmd[@]}"
