"""FP8 linear layers (`train.precision: fp8`): the matmuls of a tensor-parallel linear in float8,
everything else in bf16 mixed precision (DeepSpeed's bf16 engine: bf16 weights and gradients, fp32
master weights and optimizer state).

The recipe is per-tensor dynamic scaling, torchao's "tensorwise" one and Transformer Engine's current
scaling: before each matmul, each operand's largest magnitude (amax) gives its scale, a power of two
(so scaling and unscaling are exact and only the float8 rounding loses bits); inputs and weights are
cast to e4m3 (3 mantissa bits, up to 448), output gradients to e5m2 (2 mantissa bits, up to 57344).
Forward: y = x W^T with e4m3 x e4m3; backward: dx = dy W with e5m2 x e4m3, dW = dy^T x with
e5m2 x e4m3, each through torch's _scaled_mm operator (cuBLAS FP8 GEMMs on Hopper; a reference kernel on
CPU, for tests). Backward keeps the float8 copies of x and W, not the bf16 ones (half the bytes); the
MLP's projection keeps none of its input, recomputing it from the activation's input (`activation`).

Under tensor, sequence and context parallelism every rank holds a shard of some operands (the weight
rows or columns, the row-parallel input's features, a column-parallel output's features, the
tokens of its context chunks): their amax is the maximum over the ranks that share the tensor
(a one-element all-reduce), so every layout casts exactly as one process does. Weights are cast
each micro-batch (they change every step; a float8 copy kept across micro-batches would save the
cast only with gradient accumulation).

Why our own function over torch._scaled_mm and not torchao's Float8Linear or Transformer Engine:
both replace nn.Linear modules (or bring their own TP layers), while llm's column-, row- and grouped-QKV
layers keep their own communication, sharding metadata and checkpoint format; the operation they would
contribute is this one function, whose primitive is torch's (_scaled_mm). The cost of the choice: the casts are
separate kernels in eager mode (model.compile fuses them into the blocks' graphs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
DIVISOR = 16  # FP8 GEMMs need every dimension of both operands divisible by 16 (cuBLASLt)


@dataclass(frozen=True)
class Fp8Groups:
    """The process groups over which each operand of one linear layer is sharded (None: whole on this
    rank): the amax of an operand is the maximum over its group."""

    input: Any = None
    weight: Any = None
    grad_output: Any = None


def fp8_available(device: torch.device | str) -> str | None:
    """None when `device` runs FP8 GEMMs, else why not (one line for the config error)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"this run is on {device.type.upper()}, which has no FP8 tensor cores"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores"
    return None


def _cast(t: torch.Tensor, dtype: torch.dtype, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (2-D) in float8 with a power-of-two scale from its amax over `group`, and the inverse scale
    (what _scaled_mm multiplies the product by). An all-zero tensor gets scale 2^40 (zeros stay zero)."""
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32)
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    ratio = torch.finfo(dtype).max / amax.clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(ratio)).clamp(max=40.0))
    return _scaled(t, scale, dtype), scale.reciprocal()


def _scaled(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t * scale.to(t.dtype)).to(dtype)


def _scaled_mm(
    a: torch.Tensor, b: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, *, out_dtype: torch.dtype
) -> torch.Tensor:
    """(a x a_inv) @ (b x b_inv) in out_dtype: torch's FP8 GEMM operator (a row-major, b column-major)."""
    return torch.ops.aten._scaled_mm(a, b, a_inv, b_inv, out_dtype=out_dtype)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column by column (the layout _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


Activation = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
"""f(h), and the gradient at h given the gradient at f(h): an activation applied inside the layer."""


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, groups: Fp8Groups, activation: Activation | None
    ) -> torch.Tensor:
        h = x
        if activation is not None:  # x = f(h): keep h (which f keeps anyway), recompute x in backward
            x = activation[0](h)
        shape = x.shape
        x8, x_inv = _cast(x.reshape(-1, shape[-1]), E4M3, groups.input)
        w8, w_inv = _cast(weight, E4M3, groups.weight)
        y = _scaled_mm(x8, w8.t(), x_inv, w_inv, out_dtype=x.dtype)
        ctx.save_for_backward(x8 if activation is None else h, x_inv, w8, w_inv)
        ctx.groups, ctx.shape, ctx.dtypes, ctx.activation = groups, shape, (x.dtype, weight.dtype), activation
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        kept, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        if ctx.activation is None:
            x8 = kept
        else:  # the same float8 values as forward's: the same f(h), cast at forward's scale
            x8 = _scaled(ctx.activation[0](kept).reshape(-1, ctx.shape[-1]), x_inv.reciprocal(), E4M3)
        g8, g_inv = _cast(grad.reshape(-1, grad.shape[-1]), E5M2, ctx.groups.grad_output)
        grad_x = _scaled_mm(g8, _column_major(w8), g_inv, w_inv, out_dtype=x_dtype).view(ctx.shape)
        grad_w = _scaled_mm(g8.t().contiguous(), _column_major(x8), g_inv, x_inv, out_dtype=w_dtype)
        if ctx.activation is not None:
            grad_x = ctx.activation[1](grad_x, kept)
        return grad_x, grad_w, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, groups: Fp8Groups, activation: Activation | None = None
) -> torch.Tensor:
    """x W^T (no bias) with both matmuls of forward and backward in float8 (module docstring). With
    `activation` (f, its backward): f(x) W^T, keeping x instead of f(x)'s float8 copy and recomputing
    that copy in backward (bitwise the same: the same f(x), cast at forward's saved scale)."""
    return _Fp8Linear.apply(x, weight, groups, activation)  # type: ignore[no-any-return]


def check_fp8_shape(name: str, weight: torch.Tensor) -> str | None:
    """Why this layer's (local) weight cannot run in FP8, or None."""
    rows, cols = weight.shape
    if rows % DIVISOR or cols % DIVISOR:
        return f"{name} is {rows} x {cols} on this rank, not a multiple of {DIVISOR} in both dimensions"
    return None
