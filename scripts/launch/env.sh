# Environment for multi-node runs, sourced by every script in scripts/launch/.
# Every value is a default: anything already set in the environment wins.
#
#   MASTER_ADDR             host of rank 0 (the rendezvous). srun: first host of the allocation.
#   MASTER_PORT             rendezvous TCP port, open between all nodes (default 29500; under SLURM
#                           20000 + job id % 10000, so two jobs on one node do not collide).
#   NCCL_SOCKET_IFNAME      network interface NCCL bootstraps over (and uses without InfiniBand):
#                           e.g. eth0, ib0, or "^lo,docker" to exclude. Wrong or unset on hosts with
#                           several interfaces is the most common cause of hangs at start.
#   GLOO_SOCKET_IFNAME      the same for gloo (CPU runs, and torch's object collectives).
#   NCCL_IB_HCA             InfiniBand adapters to use, e.g. mlx5_0,mlx5_1 (all by default).
#   NCCL_IB_DISABLE=1       on clusters without InfiniBand/RoCE (plain TCP sockets).
#   NCCL_NET_GDR_LEVEL      GPUDirect RDMA distance (e.g. PHB); leave unset unless tuning.
#   NCCL_DEBUG=INFO         prints the transports NCCL picked (first thing to look at when slow).
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed collective ends the job instead of hanging it.
#   CUDA_DEVICE_MAX_CONNECTIONS=1      keeps tensor-parallel communication ordered with compute.
#   OMP_NUM_THREADS         CPU threads per rank (data loading, CPU optimizer offload).
#
# Only set what differs on your cluster; NCCL picks good defaults on a well-configured one.

if [ -n "${SLURM_JOB_ID:-}" ]; then
  : "${MASTER_PORT:=$((20000 + SLURM_JOB_ID % 10000))}"
fi
: "${MASTER_PORT:=29500}"
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
: "${OMP_NUM_THREADS:=4}"
export MASTER_PORT TORCH_NCCL_ASYNC_ERROR_HANDLING CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS
[ -n "${MASTER_ADDR:-}" ] && export MASTER_ADDR

# run_forwarding_stop_signals LAUNCHER ARGS...: runs a per-node launcher (torchrun) so that SIGTERM
# and SIGUSR1 reach its workers, which save a checkpoint and exit 0, and the launcher then exits 0.
# The launcher itself ignores both (an ignored signal stays ignored across exec, and torchrun is
# not asked to handle them): left to torchrun, it would forward them but then exit with an error,
# and srun --kill-on-bad-exit would kill the other nodes while they are still saving. SLURM
# signals every process of a step, so the workers may get the signal twice; that is harmless.
# A path given on a launch script's command line: from the directory the script was started in
# (LLM_CALLER_DIR, set by the script before it changes to the repository root), or else from the
# repository root (configs/...).
launch_path() {
  case "$1" in
    /*) echo "$1" ;;
    *) if [ -e "${LLM_CALLER_DIR:-.}/$1" ]; then echo "$LLM_CALLER_DIR/$1"; else echo "$1"; fi ;;
  esac
}

# The CONFIG argument exists, or one line and exit 2 before any worker starts.
require_config() {
  [ -f "$1" ] || { echo "error: config file '$1' not found; pass a YAML file such as configs/gpt2_125m.yaml" >&2; exit 2; }
}

run_forwarding_stop_signals() {
  trap '' TERM USR1
  "$@" &
  local pid=$! rc
  trap "pkill -TERM -P $pid" TERM
  trap "pkill -USR1 -P $pid" USR1
  while true; do
    rc=0; wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # wait returned for a signal: the launcher still runs
  done
  return "$rc"
}
true
