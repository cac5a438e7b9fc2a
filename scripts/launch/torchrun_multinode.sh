#!/usr/bin/env bash
# Multi-node training with torchrun (Kubernetes, bare metal, or started by hand on every node).
#
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=node001 bash scripts/launch/torchrun_multinode.sh CONFIG [section.key=value ...]
#
# Run it on every node with the same NNODES, NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT and the
# node's own NODE_RANK (0 on MASTER_ADDR). On Kubernetes these usually come from the job's
# environment (e.g. a PyTorchJob sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE=nodes and RANK=node index:
# NNODES=$WORLD_SIZE NODE_RANK=$RANK). Rendezvous is torchrun's static TCP store on MASTER_ADDR:MASTER_PORT.
#
# SIGTERM and SIGUSR1 (preemption, SLURM's --signal) sent to this script are forwarded to the
# workers, which save a checkpoint at the next iteration and exit 0 (run_forwarding_stop_signals
# in env.sh); torchrun then exits 0 too.
# MAX_RESTARTS=n (default 0): when a worker dies (SIGKILL, OOM, a crashed node's NCCL error), torchrun
# stops the others and starts the workers again, up to n times (on every node: the other nodes'
# collectives fail too); they resume from `latest` (checkpoint.resume: auto). A hung rank is turned into such a failure by parallel.timeout_minutes.
# Network variables: scripts/launch/env.sh.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=n NODE_RANK=i NPROC_PER_NODE=g MASTER_ADDR=host $0 CONFIG [section.key=value ...]" >&2
  exit 2
fi
CONFIG="$1"; shift
LLM_CALLER_DIR="$PWD"
cd "$(dirname "$0")/../.."
source scripts/launch/env.sh
CONFIG="$(launch_path "$CONFIG")"
require_config "$CONFIG"
: "${NNODES:=1}" "${NODE_RANK:=0}" "${NPROC_PER_NODE:=8}"
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "error: NNODES=$NNODES: set MASTER_ADDR to the host of NODE_RANK 0" >&2
  exit 2
fi
CMD=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" --max-restarts "${MAX_RESTARTS:-0}"
  --signals-to-handle SIGINT,SIGHUP,SIGQUIT
  scripts/pretrain.py --config "$CONFIG" "$@")
echo "+ ${CMD[*]}" >&2  # the command, once (set -x also traced the signal forwarding's loop)
run_forwarding_stop_signals "${CMD[@]}"
