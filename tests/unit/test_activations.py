"""llm's MLP activations: the plain expressions' values and gradients, bit for bit, keeping less for
backward (SwiGLU its input only; the projection after the activation recomputes its input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.model import activations
from llm.model.activations import activate, pair, swiglu
from llm.model.gpt import build_model
from llm.parallel.experts import grouped_linear
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


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_activation_linear_is_the_plain_grouped_gemm_bitwise_and_keeps_its_input(
    kind: str, dtype: torch.dtype
) -> None:
    """The routed experts' projection on the grouped path (one grouped GEMM over the local experts,
    torch's CPU kernel here) with the activation inside: the values and both gradients of the plain
    graph (the activation, then torch's grouped GEMM and its autograd), keeping h, the weights and
    the offsets only; an expert without rows included."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(40, 64 if kind == "swiglu" else 32, generator=g).to(dtype).requires_grad_(True)
    w = (0.1 * torch.randn(4, 48, 32, generator=g)).to(dtype).requires_grad_(True)
    offsets = torch.tensor([8, 8, 30, 40], dtype=torch.int32)
    upstream = torch.randn(40, 48, generator=g).to(dtype)
    want = grouped_linear(activate(h, kind), w, offsets, fp8=False)
    want_grads = torch.autograd.grad(want, (h, w), upstream)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = grouped_linear(h, w, offsets, fp8=False, activation=pair(kind))
    got_grads = torch.autograd.grad(got, (h, w), upstream)
    assert torch.equal(got, want) and all(torch.equal(x, y) for x, y in zip(got_grads, want_grads, strict=True))
    assert len(kept) == 3 and kept[0] is h and kept[1] is w and kept[2] is offsets  # not the activation's output
    assert torch.equal(got_grads[1][1], torch.zeros_like(w[1]))
    # on the meta device, whose torch._grouped_mm checks are the CUDA kernel's (layouts, 16-byte strides)
    hm = torch.empty(4096, h.shape[1], dtype=torch.bfloat16, device="meta", requires_grad=True)
    wm = torch.empty(8, 256, 32, dtype=torch.bfloat16, device="meta", requires_grad=True)
    ym = grouped_linear(hm, wm, torch.empty(8, dtype=torch.int32, device="meta"), fp8=False, activation=pair(kind))
    assert [t.shape for t in torch.autograd.grad(ym, (hm, wm), torch.empty_like(ym))] == [hm.shape, wm.shape]


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "gpt2_moe", "llama_moe"])
def test_the_model_trains_bitwise_as_with_the_plain_mlp(architecture: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole GPT's loss and every gradient with the recomputing MLP (the routed experts' too: MoE)
    against the plain graph."""
    moe = ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=48"]
    cfg, _ = _model([f"model.architecture={architecture.removesuffix('_moe')}", *(moe if "moe" in architecture else [])])
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
