"""FP8 linear layers (`train.precision: fp8`): the matmuls of a tensor-parallel linear in float8,
everything else in bf16 mixed precision (DeepSpeed's bf16 engine: bf16 weights and gradients, fp32
master weights and optimizer state).

The recipe is per-tensor dynamic scaling, torchao's "tensorwise" one and Transformer Engine's current
scaling: before each matmul, each operand's largest magnitude (amax) gives its scale, a power of two
(so scaling and unscaling are exact and only the float8 rounding loses bits); inputs and weights are
cast to e4m3 (3 mantissa bits, up to 448), output gradients to e5m2 (2 mantissa bits, up to 57344).
Forward: y = x W^T with e4m3 x e4m3; backward: dx = dy W with e5m2 x e4m3, dW = dy^T x with
e5m2 x e4m3, each through torch's _scaled_mm operator (cuBLAS FP8 GEMMs on Hopper; a reference kernel on
CPU, for tests). Backward keeps the float8 copy of x, not the bf16 one (half the bytes; the MLP's
projection keeps none of its input, recomputing it from the activation's input: `activation`), and
the weight itself with its scale: it casts the weight again at forward's scale (the same bits, one
elementwise pass, no collective), so no float8 weight stays alive per micro-batch in flight.

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

The routed experts (`fp8_grouped_linear`) scale differently: each token row of their input and of
their output gradient gets its own power-of-two scale (e4m3 for both, as torchao's "rowwise" recipe),
each expert's weight one. An expert's rows come from every expert-parallel rank and their number
changes every step, so a per-tensor scale would depend on which micro-batches the layout groups
together; a row's scale depends on the row alone, so every layout casts exactly as one process does,
with no collective. Forward (y = x W^T) and the input gradient (dx = dy W) run as FP8 GEMMs; the
weight gradient contracts over the tokens, along which the row scales vary, so it runs in the input
precision on the float8 input made exact again (torchao's "rowwise with high-precision grad weight"):
two of an expert's three GEMMs in float8. On Hopper each is one grouped GEMM over every local expert
(torch._scaled_grouped_mm, torch._grouped_mm for the weight gradient), as bf16 experts run.
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
    return _cast_at(t, amax, dtype)


def _cast_at(t: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` in float8 with the largest power-of-two scale that keeps `amax` (float32, broadcast over t:
    a number, per row or per expert) within range, and the inverse scale. All-zero: scale 2^40."""
    scale = torch.exp2(torch.floor(torch.log2(torch.finfo(dtype).max / amax.clamp(min=1e-12))).clamp(max=40.0))
    return _scaled(t, scale, dtype), scale.reciprocal()


def _scaled(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (t * scale.to(t.dtype)).to(dtype)


def _scaled_mm(
    a: torch.Tensor, b: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, *, out_dtype: torch.dtype
) -> torch.Tensor:
    """(a x a_inv) @ (b x b_inv) in out_dtype: torch's FP8 GEMM operator (a row-major, b column-major)."""
    return torch.ops.aten._scaled_mm(a, b, a_inv, b_inv, out_dtype=out_dtype)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix (or each of a stack) laid out column by column (the layout the FP8 GEMMs want
    for their second operand)."""
    return t.transpose(-2, -1).contiguous().transpose(-2, -1)


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
        ctx.save_for_backward(x8 if activation is None else h, x_inv, weight, w_inv)  # the weight: see below
        ctx.groups, ctx.shape, ctx.dtypes, ctx.activation = groups, shape, (x.dtype, weight.dtype), activation
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        kept, x_inv, weight, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        w8 = _scaled(weight, w_inv.reciprocal(), E4M3)  # forward's float8 weight again: same scale, same bits
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


def _rowwise_cast(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (M, K) in e4m3 with a power-of-two scale per row from the row's amax, and the inverse scales
    (M, 1) float32. An all-zero row gets scale 2^40 (zeros stay zero)."""
    return _cast_at(t, t.abs().amax(dim=-1, keepdim=True).float(), E4M3)


def _cast_each(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked weights (n, N, K) in e4m3, each with its own power-of-two scale, and the inverse scales
    (n, 1, 1) float32: each expert's weight as `_cast` casts a whole tensor."""
    return _cast_at(w, w.abs().amax(dim=(1, 2), keepdim=True).float(), E4M3)


GROUPED_FP8_GEMM = True  # False: group by group through _scaled_mm on Hopper too (the GPU test compares)


def _grouped_scaled_mm(
    a: torch.Tensor, b: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, offsets: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """Each group of rows of `a` (M, K; float8, row-major; group e ends at offsets[e]) times b[e] (n, K,
    N; float8, column-major), scaled by a_inv (M, 1) per row and b_inv (n, N) per column. Hopper: one
    grouped FP8 GEMM (torch._scaled_grouped_mm; also on the meta device, whose shape checks are the
    CUDA kernel's). Elsewhere (CPU for tests; Ada, which has none) group by group through _scaled_mm,
    reading the offsets on the host. No rows (none reached this rank's experts): no kernel."""
    if a.shape[0] == 0:
        return torch.zeros(0, b.shape[-1], dtype=out_dtype, device=a.device)
    hopper = a.is_cuda and GROUPED_FP8_GEMM and torch.cuda.get_device_capability(a.device) == (9, 0)
    if a.device.type == "meta" or hopper:
        return torch.ops.aten._scaled_grouped_mm(a, b, a_inv.flatten(), b_inv, offs=offsets, out_dtype=out_dtype)
    bounds = [0, *offsets.tolist()]
    return torch.cat([_scaled_mm(a[lo:hi], b[e], a_inv[lo:hi], b_inv[e : e + 1], out_dtype=out_dtype)
                      for e, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])  # fmt: skip


class _GroupedFp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, activation: Activation | None
    ) -> torch.Tensor:
        h = x
        if activation is not None:  # as _Fp8Linear: keep h, recompute f(h) in backward
            x = activation[0](h)
        x8, x_inv = _rowwise_cast(x)
        w8, w_inv = _cast_each(weight)
        n, rows, cols = weight.shape
        y = _grouped_scaled_mm(x8, w8.transpose(-2, -1), x_inv, w_inv.view(n, 1).expand(n, rows).contiguous(),
                               offsets, x.dtype)  # fmt: skip
        ctx.save_for_backward(x8 if activation is None else h, x_inv, weight, w_inv, offsets)
        ctx.dtypes, ctx.activation = (x.dtype, weight.dtype), activation
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        kept, x_inv, weight, w_inv, offsets = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        n, _, cols = weight.shape
        w8 = _scaled(weight, w_inv.reciprocal(), E4M3)  # forward's float8 weights again
        x8 = kept if ctx.activation is None else _scaled(ctx.activation[0](kept), x_inv.reciprocal(), E4M3)
        g8, g_inv = _rowwise_cast(grad)
        grad_x = _grouped_scaled_mm(g8, _column_major(w8), g_inv, w_inv.view(n, 1).expand(n, cols).contiguous(),
                                    offsets, x_dtype)  # fmt: skip
        exact = x8.to(grad.dtype) * x_inv.to(grad.dtype)  # the float8 input, unscaled: exact in bf16 and fp32
        if grad.shape[0]:
            grad_w = torch.ops.aten._grouped_mm(grad.t(), exact, offs=offsets).to(w_dtype)
        else:  # no rows reached these experts
            grad_w = torch.zeros_like(weight)
        if ctx.activation is not None:
            grad_x = ctx.activation[1](grad_x, kept)
        return grad_x, grad_w, None, None


def fp8_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, activation: Activation | None = None
) -> torch.Tensor:
    """The routed experts' layer: x (M, K), rows grouped by expert (expert e's end at offsets[e],
    int32), each group times its expert's weight: weight (n, N, K) -> (M, N), no bias. A scale per row
    of x and of the output gradient, one per expert's weight; forward and the input gradient in
    float8, the weight gradient from the float8 input in x's precision (module docstring).
    `activation`: as `fp8_linear`'s (f(x) W^T keeping x)."""
    return _GroupedFp8Linear.apply(x, weight, offsets, activation)  # type: ignore[no-any-return]


def check_fp8_shape(name: str, weight: torch.Tensor) -> str | None:
    """Why this layer's (local) weight cannot run in FP8, or None."""
    rows, cols = weight.shape
    if rows % DIVISOR or cols % DIVISOR:
        return f"{name} is {rows} x {cols} on this rank, not a multiple of {DIVISOR} in both dimensions"
    return None
