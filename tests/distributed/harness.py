"""Runs a function in N real processes joined by a gloo process group (CPU)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


def _entry(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import deepspeed

    from llm.engine.comm import skip_deepspeed_shm_op

    # DeepSpeed's communication layer wraps the torch process group (needed by its pipeline engine).
    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], world: int, *args: Any, timeout: float = 300.0) -> None:
    """Runs fn(rank, world, *args) on `world` processes; an exception in any fails the caller, and so
    does a run longer than `timeout` seconds (a hung collective): every process is then killed.

    The processes are forked from the test process after it has imported torch and DeepSpeed, so
    they start in milliseconds instead of importing both again (about 4 s of CPU each, which made
    these tests a fifth of the suite's time). Each child gets one intra-op thread."""
    import deepspeed  # noqa: F401  (imported once here, inherited by every child)

    context = mp.start_processes(
        _entry, args=(fn, world, free_port(), args), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):  # raises when a process failed (and ends the others)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{world} processes of {fn.__name__} ran longer than {timeout:g} s: killed"
                )
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
