#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher and a hostfile.
#
#   bash scripts/launch/deepspeed_multinode.sh HOSTFILE CONFIG [section.key=value ...]
#
# With ssh (default): run once, on the first host of HOSTFILE; DeepSpeed starts every node over
# passwordless ssh (pdsh) and forwards NCCL_*, PYTHON* and UCX_* variables plus those listed in
# ./.deepspeed_env or ~/.deepspeed_env (one VAR=value per line: put GLOO_SOCKET_IFNAME etc. there).
#
# Without ssh: run on every node yourself (or from a scheduler), each with its NODE_RANK:
#
#   NODE_RANK=0 MASTER_ADDR=node001 bash scripts/launch/deepspeed_multinode.sh hosts CONFIG ...   # on node001
#   NODE_RANK=1 MASTER_ADDR=node001 bash scripts/launch/deepspeed_multinode.sh hosts CONFIG ...   # on node002
#
# MASTER_ADDR: rank 0's host (required without ssh; with ssh DeepSpeed asks the first host).
# MASTER_PORT and the network variables: scripts/launch/env.sh. Planned stops: DeepSpeed's
# launcher kills its workers on SIGTERM; under a scheduler prefer train.exit_interval, or the
# torchrun/srun scripts, which deliver SIGTERM/SIGUSR1 to the workers so they save first.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: [NODE_RANK=i MASTER_ADDR=host] $0 HOSTFILE CONFIG [section.key=value ...]" >&2
  exit 2
fi
HOSTFILE="$1"; CONFIG="$2"; shift 2
LLM_CALLER_DIR="$PWD"
cd "$(dirname "$0")/../.."
source scripts/launch/env.sh
HOSTFILE="$(launch_path "$HOSTFILE")"; CONFIG="$(launch_path "$CONFIG")"
require_config "$CONFIG"
[ -f "$HOSTFILE" ] || { echo "error: hostfile '$HOSTFILE' not found (see scripts/launch/hostfile.example)" >&2; exit 2; }
ARGS=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
if [ -n "${NODE_RANK:-}" ]; then
  [ -n "${MASTER_ADDR:-}" ] || { echo "error: NODE_RANK is set (no-ssh mode): set MASTER_ADDR to the first host" >&2; exit 2; }
  ARGS+=(--no_ssh --node_rank "$NODE_RANK")
fi
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
echo "+ deepspeed ${ARGS[*]} scripts/pretrain.py --config $CONFIG $*" >&2  # the command, once
exec deepspeed "${ARGS[@]}" scripts/pretrain.py --config "$CONFIG" "$@"
