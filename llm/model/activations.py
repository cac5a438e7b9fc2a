"""The MLP activations, as the dense MLP and the experts share them, keeping less for backward.

- SwiGLU, silu(gate) * up, keeps only its input: autograd's own graph of the two operations keeps
  silu(gate) besides gate and up (3 F per token where 2 F would do). Backward recomputes silu(gate).
- The dense MLP's projection takes the activation inside (`activation_linear`): it keeps fc's
  output, which the activation keeps anyway, instead of the activation's output (F per token fewer)
  and recomputes the activation for its weight gradient.

Each recompute is one elementwise pass; both gradients are formed by the operations autograd would
run (torch's silu_backward / gelu_backward, F.linear's two matmuls), so values and gradients are
bitwise those of the plain graph (tests/unit/test_activations.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        return _activation_backward(grad, h, "swiglu")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[gate | up] (..., 2F) -> silu(gate) * up (..., F), keeping only `h` for backward."""
    return _SwiGLU.apply(h)  # type: ignore[no-any-return]


# ---- the activation recomputed under the projection that follows it -------------------------------
RECOMPUTE_ACTIVATION = True  # False: the plain graph (tests and benchmarks compare the two)


def activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    """`kind`: "swiglu" ([gate | up] -> silu(gate) * up, keeping only h) or "gelu" (tanh approximation)."""
    return swiglu(h) if kind == "swiglu" else F.gelu(h, approximate="tanh")


def _activation_backward(grad: torch.Tensor, h: torch.Tensor, kind: str) -> torch.Tensor:
    """The gradient at `h` of activate(h, kind), by the operations autograd would run."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)], dim=-1)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")


class _ActivationLinear(torch.autograd.Function):
    """activate(h) W^T keeping h and W only: backward recomputes activate(h) (one elementwise pass)
    for the weight gradient instead of keeping it from forward. Both matmuls of backward are the ones
    autograd runs for F.linear (grad W = dy^T a, grad a = dy W, over the tokens flattened)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.kind = kind
        return F.linear(activate(h, kind), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            a = activate(h, ctx.kind)
            grad_weight = grad2.t().mm(a.reshape(-1, a.shape[-1]))
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_a = grad2.mm(weight).view(*h.shape[:-1], weight.shape[1])
            grad_h = _activation_backward(grad_a, h, ctx.kind)
        return grad_h, grad_weight, None


def pair(kind: str) -> tuple[Any, Any]:
    """(activate, its backward) for `kind`, as llm.parallel.fp8.fp8_linear takes an activation."""
    return functools.partial(activate, kind=kind), functools.partial(_activation_backward, kind=kind)


def activation_linear(h: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """activate(h, kind) W^T (no bias), keeping only h and W for backward: the MLP's projection, whose
    own input (the activation's output) is then never kept (F values per token fewer)."""
    return _ActivationLinear.apply(h, weight, kind)  # type: ignore[no-any-return]
