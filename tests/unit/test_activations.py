"""llm's SwiGLU: the plain expression's values and gradients, bit for bit, keeping only its input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.model.activations import swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_is_the_plain_expression_bitwise_and_keeps_only_its_input(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(4, 32, 64, generator=g)).to(dtype).requires_grad_(True)
    upstream = torch.randn(4, 32, 32, generator=g).to(dtype)
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate) * up
    (want_grad,) = torch.autograd.grad(want, h, upstream)

    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = swiglu(h)
    (got_grad,) = torch.autograd.grad(got, h, upstream)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    assert len(kept) == 1 and kept[0] is h  # not silu(gate): a third less of the MLP's activations


def test_swiglu_gradient_is_the_derivative() -> None:
    h = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
