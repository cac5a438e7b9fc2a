"""Autograd collectives for tensor and sequence parallelism (Megatron's "mappings").

Each function is the identity when the tensor-parallel size is 1. Tensors are split along the
last dimension (hidden/vocab) for the TP region and along dimension 1 (sequence, layout
(B, S, H)) for the sequence-parallel region. gloo has no reduce-scatter, so on gloo it is an
all-reduce followed by taking this rank's slice (the same result, more bytes); NCCL uses the real
collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from llm.parallel.process_groups import ParallelContext


def _all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=ctx.groups["tp"])
    return x


def _all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.tp)]
    dist.all_gather(parts, x, group=ctx.groups["tp"])
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    size = x.shape[dim]
    if size % ctx.tp:
        raise ValueError(
            f"dimension {dim} of size {size} is not divisible by the tensor-parallel size {ctx.tp}"
        )
    return x.narrow(dim, ctx.tp_rank * (size // ctx.tp), size // ctx.tp).contiguous()


def _reduce_scatter(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    x = x.contiguous()
    if dist.get_backend(ctx.groups["tp"]) == "nccl" and dim == 0:
        out = torch.empty((x.shape[0] // ctx.tp, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=ctx.groups["tp"])
        return out
    if dist.get_backend(ctx.groups["tp"]) == "nccl":
        moved = x.movedim(dim, 0).contiguous()
        return _reduce_scatter(moved, ctx, 0).movedim(0, dim).contiguous()
    return _split(_all_reduce(x.clone(), ctx), ctx, dim)


class _CopyToTP(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: all-reduce, because every rank's
    shard of the next column-parallel layer contributes a partial gradient to the input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad.clone(), ctx.pctx), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce the partial sums of a row-parallel layer. Backward: identity (the
    gradient of a sum reaches every addend unchanged)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        return _all_reduce(x.clone(), pctx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dimension. Backward: all-gather the slices."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _split(x, pctx, -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, ctx.pctx, -1), None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather the last dimension. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _all_gather(x, pctx, -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split(grad, ctx.pctx, -1), None


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's slice of the sequence (activations are replicated before).
    Backward: all-gather along the sequence."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _split(x, pctx, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, ctx.pctx, 1), None


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather the sequence shards before a column-parallel layer. Backward:
    reduce-scatter, because each rank's column shard gives a partial gradient of the full input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _all_gather(x, pctx, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, ctx.pctx, 1), None


class _GatherSequenceShards(torch.autograd.Function):
    """Forward: all-gather the sequence shards of an output that joins the replicated residual stream
    (a mixture of experts routes each TP rank's share of the tokens). Backward: this rank's slice, as
    the gradient from the replicated stream is the same on every rank."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _all_gather(x, pctx, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split(grad, ctx.pctx, 1), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: reduce-scatter the partial sums of a row-parallel layer along the sequence.
    Backward: all-gather along the sequence."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _reduce_scatter(x, pctx, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, ctx.pctx, 1), None


def copy_to_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _CopyToTP.apply(x, ctx)


def reduce_from_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _ReduceFromTP.apply(x, ctx)


def scatter_to_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _ScatterToTP.apply(x, ctx)


def gather_from_tp(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _GatherFromTP.apply(x, ctx)


def scatter_to_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _ScatterToSequence.apply(x, ctx)


def gather_from_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _GatherFromSequence.apply(x, ctx)


def gather_sequence_shards(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _GatherSequenceShards.apply(x, ctx)


def reduce_scatter_to_sequence(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return x if ctx.tp == 1 else _ReduceScatterToSequence.apply(x, ctx)


def all_reduce_max(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """In-place MAX over the TP group (no autograd: used on detached values)."""
    if ctx.tp > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=ctx.groups["tp"])
    return x


def all_reduce_sum(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """In-place SUM over the TP group (no autograd)."""
    if ctx.tp > 1:
        dist.all_reduce(x, group=ctx.groups["tp"])
    return x


class _GatherFromSubgroup(torch.autograd.Function):
    """Forward: all-gather dim 0 over a subgroup of the TP group (ranks that share one KV group,
    each holding a slice of its rows). Backward: sum the gradients over the subgroup and keep this
    rank's slice (reduce-scatter), because each rank's query heads give a partial gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, index: int) -> torch.Tensor:
        ctx.group, ctx.size, ctx.index = group, size, index
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=0)[ctx.index].contiguous(), None, None, None


def gather_from_subgroup(x: torch.Tensor, group: Any, *, size: int, index: int) -> torch.Tensor:
    return x if size == 1 else _GatherFromSubgroup.apply(x, group, size, index)
