"""The MLP activations, as the dense MLP and the experts share them.

SwiGLU, silu(gate) * up, keeps only its input for backward: autograd's own graph of the two
operations keeps silu(gate) besides gate and up (3 F per token where 2 F would do), which is a
third more of the MLP's own activation memory in a llama block. Backward recomputes silu(gate), one
elementwise kernel, and forms both gradients with the same operations autograd would (the gate's
through torch's silu_backward), so values and gradients are bitwise those of the plain expression.
"""

from __future__ import annotations

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
        gate, up = h.chunk(2, dim=-1)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = grad * F.silu(gate)
        return torch.cat([grad_gate, grad_up], dim=-1)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """[gate | up] (..., 2F) -> silu(gate) * up (..., F), keeping only `h` for backward."""
    return _SwiGLU.apply(h)  # type: ignore[no-any-return]
