"""Gradient norms that count every parameter once across the model-parallel group, and whole matrices
from their tensor-parallel shards (for an optimizer that needs the full matrix, such as Muon)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from llm.parallel.layers import merge_by_spec
from llm.parallel.process_groups import ParallelContext, _comm_device


def global_grad_norm(params: Iterable[torch.nn.Parameter], ctx: ParallelContext) -> torch.Tensor:
    """L2 norm of all gradients of the full model, as a 0-dim float64 tensor on the gradients' device:
    computing it forces no host synchronisation (reading it does).

    Parameters marked `tensor_model_parallel = True` are shards: their squares are summed over the
    tensor-parallel group. Others are replicated across it and counted on TP rank 0 only. Pipeline
    stages hold disjoint parameters and are summed over the pipeline group, except the copies of
    tied weights on later stages (DeepSpeed marks them `ds_pipe_replicated`), counted once. Expert
    parameters (`expert_parallel`: each expert-parallel rank holds other experts) are summed over the
    expert-parallel group.
    """
    counted, experts = [], []
    for p in params:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if getattr(p, "expert_parallel", False):
            experts.append(p.grad.detach())
        elif getattr(p, "tensor_model_parallel", False) or ctx.tp_rank == 0:
            counted.append(p.grad.detach())
    device = (counted or experts)[0].device if counted or experts else torch.device("cpu")
    total = _squared_norm(counted, device)  # one fused norm per list
    if experts:
        experts_sq = _squared_norm(experts, device)
        if ctx.ep > 1:
            experts_sq = experts_sq.to(_comm_device())
            dist.all_reduce(experts_sq, group=ctx.groups["ep"])
        total = total + (experts_sq.to(device) if ctx.tp_rank == 0 else 0.0)
    if ctx.tp * ctx.pp > 1:
        t = total.to(_comm_device())
        dist.all_reduce(t, group=ctx.groups["mp"])
        total = t.to(device)
    return total.sqrt()


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of squares of `grads` as a float64 scalar on `device` (0 for none)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    wide = [g if g.dtype in (torch.float32, torch.float64) else g.float() for g in grads]  # bf16 norms round
    return torch.nn.utils.get_total_norm(wide, 2.0).double() ** 2


def full_matrix(local: torch.Tensor, spec: dict | None, ctx: ParallelContext) -> torch.Tensor:
    """The whole tensor of which `local` is this rank's tensor-parallel shard (split as `spec`, the
    parameter's `partition_info`), on every rank of the TP group; `local` itself when not split."""
    if spec is None or ctx.tp == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(ctx.tp)]
    dist.all_gather(shards, local.contiguous(), group=ctx.groups["tp"])
    return merge_by_spec(shards, spec)
