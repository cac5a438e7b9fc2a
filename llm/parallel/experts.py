"""Expert parallelism: the experts' stacked weights (`ExpertLinear`), one grouped GEMM over them
(`grouped_linear`), and the token exchange: the copies of this rank's tokens go to the ranks that
hold their experts, and the experts' outputs come back, by all-to-all over the expert-parallel group
(the EP consecutive data-parallel ranks of the mesh, llm/parallel/mesh.py).

Global expert e lives on EP rank e // (E / EP) as its local expert e % (E / EP). Routing is dropless
by default, so how many rows go where changes from step to step: the counts are exchanged first (one
small all-to-all), then the rows (one all-to-all each way). Reading the counts on the host is the one
host-device synchronisation an MoE layer needs (Megatron's dropless all-to-all dispatcher has it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llm.parallel.fp8 import Activation, fp8_grouped_linear
from llm.parallel.process_groups import ParallelContext


class ExpertLinear(nn.Module):
    """The same linear layer of this rank's n experts (of `num_experts`), stacked: weight (n, out, in),
    bias (n, out). The parameters carry `expert_parallel = True` and `full_shape` (every expert's).
    `fp8`: the matmuls in float8 with row-wise scales (train.precision: fp8;
    llm.parallel.fp8.fp8_grouped_linear; `use_fp8` sets it)."""

    def __init__(self, n: int, num_experts: int, in_features: int, out_features: int, *, bias: bool) -> None:
        super().__init__()
        self.weight = _expert_param(torch.empty(n, out_features, in_features), num_experts)
        self.bias = _expert_param(torch.zeros(n, out_features), num_experts) if bias else None
        self.fp8 = False


def _expert_param(t: torch.Tensor, num_experts: int) -> nn.Parameter:
    p = nn.Parameter(t)
    p.expert_parallel = True  # type: ignore[attr-defined]
    p.full_shape = torch.Size((num_experts, *t.shape[1:]))  # type: ignore[attr-defined]
    return p


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, *, fp8: bool, activation: Activation | None = None
) -> torch.Tensor:
    """(M, K) rows grouped by expert (expert e's end at offsets[e], int32) through their experts'
    stacked weights (n, N, K) -> (M, N), no bias: one grouped GEMM (torch's in bf16; in FP8
    llm.parallel.fp8.fp8_grouped_linear). With `activation` (f, its backward): f(x) W^T, keeping x (which
    f keeps anyway) rather than f(x), which backward recomputes."""
    if fp8:
        return fp8_grouped_linear(x, weight, offsets, activation)
    if activation is None:
        return torch.ops.aten._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)  # type: ignore[no-any-return]
    return _GroupedActivationLinear.apply(x, weight, offsets, activation)  # type: ignore[no-any-return]


class _GroupedActivationLinear(torch.autograd.Function):
    """f(h) W_e^T for each expert's rows keeping h, W and the offsets: backward recomputes f(h) for the
    weight gradient (as llm.parallel.layers._ActivationLinear does for one weight)."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, activation: Activation
    ) -> torch.Tensor:
        ctx.save_for_backward(h, weight, offsets)
        ctx.activation = activation
        return torch.ops.aten._grouped_mm(activation[0](h), weight.transpose(-2, -1), offs=offsets)  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        h, weight, offsets = ctx.saved_tensors
        f, f_backward = ctx.activation
        grad_h = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten._grouped_mm(grad.t(), f(h), offs=offsets) if grad.shape[0] else torch.zeros_like(weight)
        if ctx.needs_input_grad[0]:
            grad_h = f_backward(torch.ops.aten._grouped_mm(grad, weight, offs=offsets), h)
        return grad_h, grad_w, None, None


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all over `group`, `send[j]` rows to rank j and `recv[j]` rows from it.
    Backward: the same exchange reversed, so each received row's gradient returns to its sender."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


@dataclass
class Route:
    """How one dispatch moved the rows, to move the outputs back."""

    send: list[int]  # rows this rank sent to each EP rank
    recv: list[int]  # rows it received from each
    inverse: torch.Tensor  # (M,) the received order of the rows, from their order by local expert


def dispatch(
    rows: torch.Tensor, counts: torch.Tensor, ctx: ParallelContext
) -> tuple[torch.Tensor, torch.Tensor, Route | None]:
    """rows (N, H): this rank's token copies sorted by global expert; counts (E,): how many for each.
    Returns the rows for this rank's local experts, grouped by local expert (M, H), how many for each
    local expert (E / EP,), and the route back (None without expert parallelism: nothing moved)."""
    if ctx.ep == 1:
        return rows, counts, None
    group, ep = ctx.groups["ep"], ctx.ep
    local = counts.numel() // ep
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)  # (EP x E_local): per source, per local expert
    per_source = received.view(ep, local)
    both = torch.cat([counts.view(ep, local).sum(1), per_source.sum(1)]).tolist()
    send, recv = both[:ep], both[ep:]
    arrived = _AllToAll.apply(rows, send, recv, group)  # (M, H), by source rank, then local expert
    expert_of_row = torch.repeat_interleave(
        torch.arange(local, device=rows.device).repeat(ep), per_source.flatten()
    )
    order = torch.argsort(expert_of_row, stable=True)
    return arrived[order], per_source.sum(0), Route(send, recv, torch.argsort(order))


def combine(outputs: torch.Tensor, route: Route | None, ctx: ParallelContext) -> torch.Tensor:
    """The experts' outputs (M, H), in dispatch's order, back to the ranks and order the rows came
    from: (N, H), row for row with `dispatch`'s input."""
    if route is None:
        return outputs
    return _AllToAll.apply(outputs[route.inverse], route.recv, route.send, ctx.groups["ep"])


def sum_over_sequence(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """`t` summed in place (no autograd) over the ranks that hold other tokens of the same sequences:
    the tensor-parallel group (each routes its share of the tokens) and the context-parallel group
    (each holds its chunks)."""
    for kind, size in (("tp", ctx.tp), ("cp", ctx.cp)):
        if size > 1:
            dist.all_reduce(t, group=ctx.groups[kind])
    return t


def sum_over_data(t: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """`t` summed over every rank of this pipeline stage that routes other tokens through the same
    router: the tensor- and context-parallel groups (`sum_over_sequence`) and the data-parallel group
    (a copy; `t` itself unchanged)."""
    out = sum_over_sequence(t.clone(), ctx)
    if ctx.dp > 1:
        dist.all_reduce(out, group=ctx.groups["dp"])
    return out
