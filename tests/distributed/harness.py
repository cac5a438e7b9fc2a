"""Runs a function in N real processes joined by a gloo process group (CPU)."""

from __future__ import annotations

import os
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

    from llm.parallel.context import skip_deepspeed_shm_op

    # DeepSpeed's communication layer wraps the torch process group (needed by its pipeline engine).
    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Runs fn(rank, world, *args) on `world` processes; an exception in any fails the caller."""
    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
