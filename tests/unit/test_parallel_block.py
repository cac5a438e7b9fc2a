"""model.parallel_block: x + attn(norm(x)) + mlp(norm(x)) (GPT-J / PaLM; two norms: GPT-NeoX)."""

from __future__ import annotations

import pytest
import torch

from llm.config import ModelConfig
from llm.model.gpt import build_model
from llm.model.hf import NoHFClassError, hf_config


def _cfg(arch: str, norms: int) -> ModelConfig:
    return ModelConfig(architecture=arch, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                       vocab_size=100, parallel_block=True, parallel_block_norms=norms)  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("norms", [1, 2])
def test_block_computes_the_parallel_formula(arch: str, norms: int) -> None:
    model = build_model(_cfg(arch, norms), seed=1).eval()
    names = {n for n, _ in model.named_parameters()}
    assert ("layers.0.post_attention_norm.weight" in names) == (norms == 2)
    block = model.layers[0]
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h_attn = block.input_norm(x)
        h_mlp = block.post_attention_norm(x) if norms == 2 else h_attn
        attn = torch.nn.functional.scaled_dot_product_attention  # the formula, written out
        q, k, v = block.attention._split_qkv(torch.nn.functional.linear(h_attn, block.attention.qkv.weight,
                                                                        block.attention.qkv.bias))  # fmt: skip
        if block.attention.rotary is not None:
            q, k = block.attention.rotary(q, 0), block.attention.rotary(k, 0)
        a = attn(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(2, 16, 32)
        a = torch.nn.functional.linear(a, block.attention.proj.weight, block.attention.proj.bias)
        expected = x + a + block.mlp(h_mlp)
        got, _ = block(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_export_is_refused_in_one_line() -> None:
    for arch in ("gpt2", "llama"):
        with pytest.raises(NoHFClassError, match="model.parallel_block has no transformers class") as e:
            hf_config(_cfg(arch, 1))
        assert "\n" not in str(e.value)
