"""model.parallel_block: x + attn(norm(x)) + mlp(norm(x)) (GPT-J / PaLM; two norms: GPT-NeoX)."""

from __future__ import annotations

from pathlib import Path

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


def test_compiled_blocks_match_eager_with_checkpointing_and_documents() -> None:
    """model.compile with activation checkpointing and document-aware attention (which runs eagerly
    inside the compiled block): same loss and gradients as eager, same parameter names."""
    from llm.config import DataConfig
    from llm.model.inputs import model_inputs

    kw = {"architecture": "llama", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
          "vocab_size": 300, "activation_checkpointing": True}  # fmt: skip
    eager = build_model(ModelConfig(**kw), seed=1).train()
    compiled = build_model(ModelConfig(**kw, compile=True), seed=1).train()
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]
    tokens = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    tokens[:, [5, 17]] = 7
    docs = DataConfig(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True, eod_token_id=7)
    for _ in range(2):  # the second call runs the compiled code without recompiling
        for m in (eager, compiled):
            m.zero_grad()
            m(*model_inputs(tokens, docs)).backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_export_refuses_before_reading_any_weights(tmp_path: Path) -> None:
    """A checkpoint of parallel blocks holding only its meta: the refusal names the model, not a missing
    weight file (export reads the saved config before it loads and merges the weights)."""
    from llm.checkpoint.format import build_meta, write_meta
    from llm.config import load_config
    from llm.export.to_hf import export_checkpoint

    tag = tmp_path / "iter_0000001"
    tag.mkdir()
    cfg = load_config(None, ["model.parallel_block=true", "model.vocab_size=300"])
    write_meta(tag, build_meta({"iteration": 1, "consumed_samples": 0}, cfg, zero_stage=0, world_size=1))
    with pytest.raises(NoHFClassError, match="model.parallel_block has no transformers class"):
        export_checkpoint(tag, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
