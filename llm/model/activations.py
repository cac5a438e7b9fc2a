"""The MLP activations, as the dense MLP and the experts share them, keeping less for backward.

- SwiGLU, silu(gate) * up, keeps only its input: autograd's own graph of the two operations keeps
  silu(gate) besides gate and up (3 F per token where 2 F would do). Backward recomputes silu(gate).
- The MLP's projection takes the activation inside (`pair`; llm.parallel.layers.linear for the dense
  MLP, llm.parallel.experts.grouped_linear or llm.parallel.layers.linear per expert for the routed
  experts): it keeps fc's output, which the activation keeps anyway, instead of the activation's
  output (F per token, or per routed copy, fewer) and recomputes the activation for its weight
  gradient.

Each recompute is one elementwise pass; both gradients are formed by the operations autograd would
run (torch's silu_backward / gelu_backward, F.linear's or the grouped GEMM's two matmuls), so values
and gradients are bitwise those of the plain graph (tests/unit/test_activations.py).
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


def pair(kind: str) -> tuple[Any, Any]:
    """(activate, its backward) for `kind`: the activation a linear layer applies inside itself
    (llm.parallel.layers.linear), which then keeps only the activation's input."""
    return functools.partial(activate, kind=kind), functools.partial(_activation_backward, kind=kind)

