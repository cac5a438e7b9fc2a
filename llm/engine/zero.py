"""ZeRO's state through DeepSpeed's public helpers: a ZeRO-3 checkpoint's full fp32 weights, and
setting a parameter's full fp32 master weight and optimizer state in the running engine whatever
its ZeRO stage (DeepSpeed's fragment API; a ZeRO-3 parameter gathered for the write)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


def zero3_fp32_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a ZeRO-3 checkpoint (DeepSpeed's zero_to_fp32 consolidation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))


def set_full_fp32_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value)


def set_full_optimizer_state(p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    safe_set_full_optimizer_state(p, value, key)


@contextlib.contextmanager
def gathered_for_write(p: torch.nn.Parameter) -> Iterator[None]:
    """A ZeRO-3 parameter whole on every rank for the block; rank 0's values are kept after it."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        yield
