"""Megatron-style tensor-parallel layers. With TP size 1 each is exactly the dense op.

Every sharded parameter carries `tensor_model_parallel = True` (DeepSpeed's convention, so ZeRO
and gradient clipping count it per shard), `partition_dim`, `partition_stride` and `full_shape`.
A stride s > 1 means the full tensor is s blocks stacked along `partition_dim` (e.g. SwiGLU's
[gate | up]) and each rank holds its slice of every block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm.parallel.experts import ExpertLinear
from llm.parallel.fp8 import Activation, Fp8Groups, check_fp8_shape, fp8_linear
from llm.parallel.mappings import (
    copy_to_tp,
    gather_from_sequence,
    gather_from_subgroup,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence,
)
from llm.parallel.process_groups import ParallelContext
from llm.parallel.qkv import qkv_blocks


def shard_tensor(full: torch.Tensor, *, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of a full tensor."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def merge_shards(shards: list[torch.Tensor], *, dim: int, stride: int) -> torch.Tensor:
    """The inverse of `shard_tensor` over all ranks' shards."""
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[b] for p in per_rank], dim=dim) for b in range(stride)], dim=dim)


def mark_sharded(p: nn.Parameter, *, dim: int, stride: int, full_shape: tuple[int, ...]) -> nn.Parameter:
    p.tensor_model_parallel = True  # type: ignore[attr-defined]
    p.partition_dim = dim  # type: ignore[attr-defined]
    p.partition_stride = stride  # type: ignore[attr-defined]
    p.full_shape = torch.Size(full_shape)  # type: ignore[attr-defined]
    return p


def partition_info(p: torch.Tensor) -> dict[str, Any] | None:
    """How a tensor-parallel parameter is sharded (JSON-able; saved in checkpoints), else None.

    {"dim": d, "stride": s}: blocks along dim d, each split evenly (see shard_tensor).
    {"qkv": [heads, groups, head_dim]}: grouped QKV with fewer KV groups than TP ranks.
    """
    if not getattr(p, "tensor_model_parallel", False):
        return None
    info = p.__dict__
    if "qkv_layout" in info:
        return {"qkv": list(info["qkv_layout"])}
    return {"dim": int(info["partition_dim"]), "stride": int(info["partition_stride"])}


def full_shape_of(p: torch.Tensor) -> torch.Size:
    return torch.Size(p.__dict__["full_shape"])


def shard_by_spec(full: torch.Tensor, spec: dict[str, Any], *, rank: int, size: int) -> torch.Tensor:
    if "qkv" not in spec:
        return shard_tensor(full, dim=spec["dim"], stride=spec["stride"], rank=rank, size=size)
    heads, groups, d = spec["qkv"]
    share = size // groups  # ranks per KV group
    g, j = rank // share, rank % share
    blocks = qkv_blocks(full, heads=heads, groups=groups, head_dim=d)[g]  # (q/g + 2, d, ...)
    per = heads // size  # query heads on this rank
    q = blocks[j * per : (j + 1) * per].reshape(per * d, *full.shape[1:])
    k = blocks[-2, j * d // share : (j + 1) * d // share]
    v = blocks[-1, j * d // share : (j + 1) * d // share]
    return torch.cat([q, k, v]).contiguous()


def merge_by_spec(shards: list[torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
    """The inverse of shard_by_spec over all ranks' shards (in TP-rank order)."""
    if "qkv" not in spec:
        return merge_shards(shards, dim=spec["dim"], stride=spec["stride"])
    heads, groups, d = spec["qkv"]
    size = len(shards)
    share, per = size // groups, heads // size
    rest = shards[0].shape[1:]
    out = []
    for g in range(groups):
        mine = shards[g * share : (g + 1) * share]
        q = torch.cat([s[: per * d] for s in mine])
        k = torch.cat([s[per * d : per * d + d // share] for s in mine])
        v = torch.cat([s[per * d + d // share :] for s in mine])
        out.append(torch.cat([q, k, v]).reshape(-1, *rest))
    return torch.cat(out)


def sequence_parallel_param(p: torch.Tensor, ctx: ParallelContext, enabled: bool) -> torch.Tensor:
    """A replicated parameter used on sequence shards gets a partial gradient on each rank; routing
    it through copy_to_tp sums those partials in backward, so every rank holds the full gradient."""
    return copy_to_tp(p, ctx) if enabled else p


def tp_input(x: torch.Tensor, ctx: ParallelContext, sequence_parallel: bool) -> torch.Tensor:
    """The input of column-parallel layers: sequence shards gathered (SP), or the replicated tensor
    whose gradient is summed over the TP group in backward."""
    return gather_from_sequence(x, ctx) if sequence_parallel else copy_to_tp(x, ctx)


def tp_output(partial: torch.Tensor, ctx: ParallelContext, sequence_parallel: bool) -> torch.Tensor:
    """Row-parallel partial sums -> the sum, all-reduced (or reduce-scattered along the sequence)."""
    return reduce_scatter_to_sequence(partial, ctx) if sequence_parallel else reduce_from_tp(partial, ctx)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp8: Fp8Groups | None,
    activation: Activation | None = None,
) -> torch.Tensor:  # fmt: skip
    """x W^T + b, the matmuls in float8 when the layer was switched to FP8 (llm.parallel.fp8). With
    `activation` (f, its backward): f(x) W^T + b, keeping x (which f keeps anyway) rather than f(x),
    which backward recomputes."""
    if fp8 is None and activation is None:
        return F.linear(x, weight, bias)
    if fp8 is None:
        y = _ActivationLinear.apply(x, weight, activation)
    else:
        y = fp8_linear(x, weight, fp8, activation)
    return y if bias is None else y + bias


class _ActivationLinear(torch.autograd.Function):
    """f(h) W^T keeping h and W only: backward recomputes f(h) (one elementwise pass) for the weight
    gradient instead of keeping it from forward. Both matmuls of backward are the ones autograd runs
    for F.linear (grad W = dy^T a, grad a = dy W, over the tokens flattened), so the values and
    gradients are bitwise those of F.linear(f(h), W)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, activation: Activation) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.activation = activation
        return F.linear(activation[0](h), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h, weight = ctx.saved_tensors
        f, f_backward = ctx.activation
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            a = f(h)
            grad_weight = grad2.t().mm(a.reshape(-1, a.shape[-1]))
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = f_backward(grad2.mm(weight).view(*h.shape[:-1], weight.shape[1]), h)
        return grad_h, grad_weight, None


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({tp})")
    return n // tp


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) across the TP group.

    Input: replicated (B, S, in), or sequence-sharded (B, S/tp, in) with sequence parallelism.
    Output: (B, S, out/tp), or gathered (B, S, out) with `gather_output`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        ctx: ParallelContext,
        stride: int = 1,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.fp8: Fp8Groups | None = None  # set by use_fp8 (train.precision: fp8)
        local = _divide(out_features, ctx.tp * stride, "output features / stride") * stride
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(local, in_features)),
            dim=0,
            stride=stride,
            full_shape=(out_features, in_features),
        )
        self.bias = (
            mark_sharded(nn.Parameter(torch.zeros(local)), dim=0, stride=stride, full_shape=(out_features,))
            if bias
            else None
        )

    def forward(self, x: torch.Tensor, *, gathered: bool = False) -> torch.Tensor:
        """`gathered`: x already went through `tp_input` (shared by several layers reading it)."""
        x = x if gathered else tp_input(x, self.ctx, self.sequence_parallel)
        y = linear(x, self.weight, self.bias, self.fp8)  # (B, S, out / tp)
        return gather_from_tp(y, self.ctx) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features): each rank multiplies its slice of
    the input features and the partial sums are all-reduced (or reduce-scattered along the
    sequence with sequence parallelism). The bias is replicated and added after the reduction."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        ctx: ParallelContext,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.sequence_parallel = sequence_parallel
        self.fp8: Fp8Groups | None = None  # set by use_fp8 (train.precision: fp8)
        local = _divide(in_features, ctx.tp, "input features")
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(out_features, local)),
            dim=1,
            stride=1,
            full_shape=(out_features, in_features),
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, *, reduce: bool = True, activation: Activation | None = None) -> torch.Tensor:
        """`reduce=False`: this rank's partial sums, without the bias (the caller adds several layers'
        partial sums, calls `tp_output` once and adds their `output_bias`). `activation`: applied to x
        inside the layer, which then keeps x rather than its activation (`linear`)."""
        y = linear(x, self.weight, None, self.fp8, activation)  # (B, S, out) partial sums
        if not reduce:
            return y
        return self.output_bias(tp_output(y, self.ctx, self.sequence_parallel))

    def output_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + sequence_parallel_param(self.bias, self.ctx, self.sequence_parallel)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split into contiguous row ranges across the TP group.
    Each rank looks up the ids it owns (zeros elsewhere); the partial results are summed."""

    def __init__(self, num_embeddings: int, dim: int, *, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        local = _divide(num_embeddings, ctx.tp, "padded vocabulary size")
        self.vocab_start = ctx.tp_rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(local, dim)), dim=0, stride=1, full_shape=(num_embeddings, dim)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp == 1:
            return F.embedding(ids, self.weight)  # (B, S, H)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, S, H) partial
        return reduce_from_tp(out, self.ctx)


class GroupedQKVParallelLinear(nn.Module):
    """QKV projection for grouped-query attention with fewer KV groups than TP ranks.

    r = tp / groups consecutive ranks share one KV group. Each rank holds its heads / tp query
    heads and a 1/r slice of its group's K and V rows, so every parameter element lives on exactly
    one rank (gradient norms and ZeRO need no special case). In forward the K/V slices are
    all-gathered over the r ranks (backward: their partial gradients are summed and each rank keeps
    its slice). Output: (B, S, (heads / tp + 2) x head_dim) laid out as one group [q.. | k | v].
    """

    def __init__(
        self,
        hidden: int,
        *,
        heads: int,
        groups: int,
        head_dim: int,
        ctx: ParallelContext,
        sequence_parallel: bool,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.sequence_parallel = sequence_parallel
        self.share = ctx.tp // groups
        if head_dim % self.share:
            raise ValueError(f"head size {head_dim} must be divisible by TP / query groups = {self.share}")
        self.index = ctx.tp_rank % self.share
        self.subgroup = ctx.tp_subgroup(self.share)
        self.q_rows = heads // ctx.tp * head_dim
        self.kv_slice = head_dim // self.share
        local = self.q_rows + 2 * self.kv_slice
        weight = nn.Parameter(torch.empty(local, hidden))
        weight.tensor_model_parallel = True  # type: ignore[attr-defined]
        weight.qkv_layout = (heads, groups, head_dim)  # type: ignore[attr-defined]
        weight.full_shape = torch.Size(((heads + 2 * groups) * head_dim, hidden))  # type: ignore[attr-defined]
        self.weight = weight
        self.bias = None

    def forward(self, x: torch.Tensor, *, gathered: bool = False) -> torch.Tensor:
        x = x if gathered else tp_input(x, self.ctx, self.sequence_parallel)
        q_w = self.weight[: self.q_rows]
        kv = gather_from_subgroup(
            self.weight[self.q_rows :], self.subgroup, size=self.share, index=self.index
        )
        kv = kv.view(self.share, 2, self.kv_slice, -1)  # (r, k|v, d / r, H)
        k_w = kv[:, 0].reshape(self.share * self.kv_slice, -1)  # (d, H)
        v_w = kv[:, 1].reshape(self.share * self.kv_slice, -1)
        return F.linear(x, torch.cat([q_w, k_w, v_w]))  # (B, S, (heads / tp + 2) d)


def use_fp8(model: nn.Module, ctx: ParallelContext) -> list[str]:
    """Switches every column- and row-parallel linear of `model` to FP8 matmuls (train.precision: fp8),
    with the groups over which each operand is sharded: the weight over TP; the column layers' input
    over CP (its tokens) and their output gradient over CP x TP; the row layers' input over CP x TP and
    their output gradient over CP. The routed experts' layers too, with row-wise scales (no group:
    llm.parallel.fp8.fp8_grouped_linear). The LM head and the MoE router stay in bf16. Returns why
    layers cannot, empty if all can: dimensions not multiples of 16, or a grouped QKV layer (fewer KV
    groups than TP ranks: each rank's K/V gradient is a partial sum, which float8 would round unlike
    one process; config validation refuses it first)."""

    def group(kind: str, size: int) -> Any:
        return ctx.groups[kind] if size > 1 else None

    tp, cp, both = group("tp", ctx.tp), group("cp", ctx.cp), group("cp_tp", ctx.tp * ctx.cp)
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, RowParallelLinear):
            module.fp8 = Fp8Groups(input=both, weight=tp, grad_output=cp)
        elif isinstance(module, ColumnParallelLinear):
            module.fp8 = Fp8Groups(input=cp, weight=tp, grad_output=both)
        elif isinstance(module, GroupedQKVParallelLinear):
            problems.append(f"{name} shares its KV group with other TP ranks (fewer KV groups than TP ranks)")
            continue
        elif isinstance(module, ExpertLinear):
            module.fp8 = True
        else:
            continue
        problem = check_fp8_shape(name, module.weight[0] if isinstance(module, ExpertLinear) else module.weight)
        if problem:
            problems.append(problem)
    return problems
