"""Muon's step on small tensors against a reference written here, and its AdamW half against torch's."""

from __future__ import annotations

import math

import pytest
import torch

from llm.config import TrainConfig
from llm.parallel.process_groups import ParallelContext
from llm.training.muon import Muon


def reference_orthogonalize(u: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration, as published (Jordan et al., 2024)."""
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if u.shape[0] > u.shape[1] else x


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_two_muon_steps_match_the_reference(shape: tuple[int, int], nesterov: bool) -> None:
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    grads = [torch.randn(shape), torch.randn(shape)]
    cfg = TrainConfig(lr=0.02, weight_decay=0.1, muon_momentum=0.9, muon_nesterov=nesterov, muon_ns_steps=5)
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([{"params": [p], "use_muon": True}], cfg, ParallelContext(world_size=1, rank=0))
    w, buf = w0.clone(), torch.zeros(shape)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        u = 0.1 * g + 0.9 * buf if nesterov else buf
        o = reference_orthogonalize(u, 5) * 0.2 * math.sqrt(max(shape))
        w = w * (1 - 0.02 * 0.1) - 0.02 * o
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, rtol=1e-6, atol=1e-7)


def test_the_orthogonal_factor_has_singular_values_near_one() -> None:
    torch.manual_seed(1)
    u = torch.randn(32, 16)  # a gradient-like matrix (condition number about 6)
    s = torch.linalg.svdvals(reference_orthogonalize(u, 5))
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25  # what the quintic iteration promises


def test_the_adamw_half_steps_as_torchs_adamw() -> None:
    torch.manual_seed(2)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3).clone())
    b.data.copy_(a.data)
    ours = Muon([{"params": [a], "use_muon": False}], cfg, ParallelContext(world_size=1, rank=0))
    theirs = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
