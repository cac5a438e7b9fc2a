"""Where evaluation runs: the device, and one process or every process a launcher started."""

from __future__ import annotations

import os

import torch

from llm.engine.comm import init_distributed
from llm.parallel.launcher import detect_launch
from llm.parallel.process_groups import ParallelContext


def default_device() -> str:
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def eval_context() -> ParallelContext:
    """One process, or every process a launcher started (torchrun, deepspeed, srun): evaluation
    is then data-parallel (a full model per process)."""
    if detect_launch().world_size > 1:
        init_distributed()
        return ParallelContext.build(tp=1, pp=1)
    return ParallelContext(world_size=1, rank=0)
