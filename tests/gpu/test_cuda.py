"""Opt-in GPU checks (marked `gpu`; skipped where no CUDA device exists, never counted as CPU coverage)."""

from __future__ import annotations

import pytest
import torch

from llm.config import ModelConfig
from llm.model.gpt import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_forward_backward_tracks_fp32_on_cuda() -> None:
    cfg = ModelConfig(architecture="llama", num_layers=2, hidden_size=256, num_attention_heads=4,
                      num_query_groups=2, seq_length=128, vocab_size=1000)  # fmt: skip
    model = build_model(cfg, seed=0).cuda()
    tokens = torch.randint(0, 1000, (4, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fp32 = model(tokens[:, :-1], tokens[:, 1:])
    bf16 = model.to(torch.bfloat16)(tokens[:, :-1], tokens[:, 1:])
    bf16.backward()
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
