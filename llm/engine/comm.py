"""torch.distributed set up through DeepSpeed's comm layer, from whichever launcher started this
process: the default group (on torchrun's store under a per-restart prefix when its agent owns the
store), DeepSpeed adopting it, the timeout of every group made later, and DeepSpeed's CPU
shared-memory op switched off."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from llm.parallel.launcher import LaunchEnv, detect_launch


def init_distributed(*, backend: str | None = None, timeout_minutes: float | None = None) -> LaunchEnv:
    """Initializes torch.distributed from whichever launcher started this process.

    deepspeed, torchrun, srun, mpirun/mpiexec or plain `python` (one process: a private loopback
    rendezvous); `llm.parallel.launcher` reads their variables through one code path. A collective
    that waits longer than `timeout_minutes` (torch's default: 30) fails instead of hanging.
    """
    launch = detect_launch()
    launch.export(os.environ)
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen == "nccl":
            # srun --gpus-per-task=1 (or a per-task CUDA_VISIBLE_DEVICES) shows each task one GPU while
            # SLURM_LOCALID counts tasks on the node: the device is then the local rank modulo what
            # is visible, and DeepSpeed (which reads LOCAL_RANK) must see the same index.
            device = launch.local_rank % max(torch.cuda.device_count(), 1)
            os.environ["LOCAL_RANK"] = str(device)
            torch.cuda.set_device(device)
        import deepspeed

        skip_deepspeed_shm_op()
        timeout = timedelta(minutes=timeout_minutes) if timeout_minutes is not None else None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _init_on_agent_store(launch, chosen, timeout)
        extra = {} if timeout is None else {"timeout": timeout}
        deepspeed.init_distributed(
            dist_backend=chosen, auto_mpi_discovery=False, **extra
        )  # adopts that group
        if timeout is not None:
            _default_group_timeout(timeout)
    return launch


def _default_group_timeout(timeout: timedelta) -> None:
    """Groups made later by `new_group` without a timeout (DeepSpeed's pipeline, data, model and
    tied-weight groups) get torch's module default (30 minutes), not the default group's: that default
    becomes `timeout`, so a collective in any group gives up after parallel.timeout_minutes."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout


def _init_on_agent_store(launch: LaunchEnv, backend: str, timeout: timedelta | None) -> None:
    """The default process group on torchrun's store under a prefix of its own per restart.

    torchrun's agent keeps one TCPStore for all restarts (torch 2.13, static and c10d rendezvous)
    while init_process_group's env:// rendezvous uses it without a per-attempt prefix, so after
    `--max-restarts` a new rank can read a dead rank's address from the previous attempt and fail to
    connect (seen 1 run in 3). TORCHELASTIC_RESTART_COUNT names the attempt."""
    wait = timeout or timedelta(minutes=30)  # torch's default
    client = dist.TCPStore(
        launch.master_addr, launch.master_port, launch.world_size, is_master=False, timeout=wait
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"/llm/attempt_{attempt}", client)
    dist.init_process_group(
        backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=wait
    )


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU shared-memory all-reduce serves only `inference_all_reduce`, which llm never
    calls; setting it up JIT-compiles a C++ op on first use and leaves a 66 MB file per rank in
    /dev/shm that is never removed (a test suite filled 24 GB of RAM with them). Marking the op
    incompatible makes DeepSpeed skip it; gloo/NCCL collectives are unaffected."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
