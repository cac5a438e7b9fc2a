"""llm's MLP activations: the plain expressions' values and gradients, bit for bit, keeping less for
backward (SwiGLU its input only; the projection after the activation recomputes its input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.model import activations
from llm.model.activations import activate, pair, swiglu
from llm.model.gpt import build_model
from llm.parallel.layers import linear
from tests.unit.test_planner import _model


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


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_linear_is_the_plain_graph_bitwise_and_keeps_its_input_and_weight(
    kind: str, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 24, 64 if kind == "swiglu" else 32, generator=g).to(dtype).requires_grad_(True)
    w = (0.1 * torch.randn(48, 32, generator=g)).to(dtype).requires_grad_(True)
    upstream = torch.randn(2, 24, 48, generator=g).to(dtype)
    a = F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] if kind == "swiglu" else F.gelu(h, approximate="tanh")
    want = F.linear(a, w)
    want_grads = torch.autograd.grad(want, (h, w), upstream)

    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = linear(h, w, None, None, pair(kind))
    got_grads = torch.autograd.grad(got, (h, w), upstream)
    assert torch.equal(got, want) and all(torch.equal(x, y) for x, y in zip(got_grads, want_grads, strict=True))
    assert len(kept) == 2 and kept[0] is h and kept[1] is w  # not the activation's output
    h64 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(5, 4 if kind == "swiglu" else 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: linear(x, y, None, None, pair(kind)), (h64, w64))
    assert torch.equal(activate(h.detach(), kind), a.detach())


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_the_model_trains_bitwise_as_with_the_plain_mlp(architecture: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole GPT's loss and every gradient with the recomputing MLP against the plain graph."""
    cfg, _ = _model([f"model.architecture={architecture}"])
    tokens = torch.randint(0, 1000, (2, cfg.model.seq_length + 1), generator=torch.Generator().manual_seed(2))
    results = []
    for recompute in (True, False):
        monkeypatch.setattr(activations, "RECOMPUTE_ACTIVATION", recompute)
        model = build_model(cfg.model, seed=1)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))
