from __future__ import annotations

import dataclasses

import pytest
import torch

from llm.config import ModelConfig
from llm.eval.generate import ContextLengthError, fit_context, generate
from llm.model.gpt import GPT, build_model, init_full_parameter, parameter_groups
from llm.model.hf import from_hf_state_dict, hf_config, to_hf_state_dict

VOCAB = 300  # padded to 384: padding must never show up in logits


def _cfg(arch: str, **kw) -> ModelConfig:
    base = dict(
        architecture=arch,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=32,
        vocab_size=VOCAB,
    )
    return ModelConfig(**{**base, **kw})


PRESETS = [
    ("gpt2", {}),
    ("llama", {}),
    ("llama", {"num_query_groups": 2}),
    ("llama", {"num_query_groups": 1, "tie_embeddings": True}),
]


@pytest.mark.parametrize("arch, kw", PRESETS)
def test_shapes_and_padding(arch: str, kw: dict) -> None:
    cfg = _cfg(arch, **kw)
    model = build_model(cfg, seed=0)
    assert model.embed.weight.shape == (384, 64)
    x = torch.randint(0, VOCAB, (3, 20))
    assert model(x).shape == (3, 20, VOCAB)
    loss = model(x, x)
    assert loss.ndim == 0 and loss.item() > 0


@pytest.mark.parametrize("arch, kw", PRESETS)
def test_causality(arch: str, kw: dict) -> None:
    model = build_model(_cfg(arch, **kw), seed=0).eval()
    x = torch.randint(0, VOCAB, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch, kw", PRESETS)
def test_hugging_face_parity(arch: str, kw: dict) -> None:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg = _cfg(arch, **kw)
    model = build_model(cfg, seed=1).eval()
    hf = (LlamaForCausalLM if cfg.is_llama else GPT2LMHeadModel)(hf_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in m or "attn.bias" in m for m in missing)
    x = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    back = from_hf_state_dict(hf.state_dict(), cfg)
    for name, value in model.state_dict().items():
        rows = VOCAB if name in ("embed.weight", "lm_head.weight") else value.shape[0]
        torch.testing.assert_close(back[name][:rows], value[:rows], rtol=0, atol=0)


def test_initialization_depends_on_seed_and_name_only() -> None:
    cfg = _cfg("llama", num_query_groups=2)
    a, b = build_model(cfg, seed=5), build_model(cfg, seed=5)
    torch.manual_seed(123)  # global RNG state must not matter
    c = build_model(cfg, seed=5)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n
    d = build_model(cfg, seed=6)
    assert not torch.equal(a.layers[0].attention.qkv.weight, d.layers[0].attention.qkv.weight)
    w = init_full_parameter("layers.1.mlp.proj.weight", torch.Size([64, 256]), cfg, 5)
    assert abs(w.std().item() - 0.02 / 2.0) < 0.002  # scaled init 0.02 / sqrt(2 L)
    assert torch.equal(
        init_full_parameter("layers.0.input_norm.weight", torch.Size([64]), cfg, 5), torch.ones(64)
    )


def test_parameter_groups_exclude_biases_and_norms() -> None:
    model = build_model(_cfg("gpt2"), seed=0)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if n.endswith(".bias") or "norm" in n
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_activation_checkpointing_gives_identical_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        model = build_model(_cfg("llama", activation_checkpointing=ckpt), seed=0).train()
        x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        model(x, x).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_changes_nothing_but_speed(arch: str) -> None:
    model = build_model(_cfg(arch, num_query_groups=2 if arch == "llama" else None), seed=0)
    prompt = [5, 17, 42, 99]
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 3}):
        with_cache = generate(model, prompt, max_new_tokens=20, use_cache=True, **kw)
        without = generate(model, prompt, max_new_tokens=20, use_cache=False, **kw)
        assert with_cache == without and len(with_cache) == 20
        assert all(0 <= t < VOCAB for t in with_cache)
    again = generate(model, prompt, max_new_tokens=20, temperature=0.9, seed=3)
    assert again == generate(model, prompt, max_new_tokens=20, temperature=0.9, seed=3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_past_the_context_is_refused_or_slides_explicitly(arch: str) -> None:
    model = build_model(_cfg(arch), seed=0)  # context 32
    prompt = [int(t) for t in torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))]
    with pytest.raises(ContextLengthError, match="prompt is 40 tokens but the model's context is 32"):
        generate(model, prompt, max_new_tokens=1)
    with pytest.raises(ContextLengthError, match="lower --max-new-tokens to 3, or pass --sliding-window"):
        generate(model, prompt[:30], max_new_tokens=10)
    assert len(generate(model, prompt[:30], max_new_tokens=3, temperature=0.0)) == 3  # 32 positions: fits
    # truncation leaves room for every new token: 23 prompt tokens + 10 new (the last not fed back) = 32
    drop, warnings = fit_context(40, 10, 32, truncate_prompt=True, sliding_window=False)
    assert drop == 17 and warnings == ["the prompt was truncated from the left to its last 23 tokens (17 dropped) "
                                       "to leave room for 10 new tokens in the context of 32"]  # fmt: skip
    drop, warnings = fit_context(32, 10, 32, truncate_prompt=False, sliding_window=True)
    assert drop == 0 and len(warnings) == 1 and "from new token 2 on" in warnings[0]
    drop = 8  # the 32-token prompt prompt[8:] generates past the context
    for use_cache in (True, False):
        out = generate(model, prompt[drop:], max_new_tokens=10, temperature=0.0, sliding_window=True,
                       use_cache=use_cache)  # fmt: skip
        seq = prompt[drop:] + out
        with torch.no_grad():  # each new token is the argmax given exactly the last 32 tokens before it
            expected = [int(model(torch.tensor([seq[: 32 + i][-32:]]))[0, -1].argmax()) for i in range(10)]
        assert out == expected


def test_padded_logits_never_used() -> None:
    model: GPT = build_model(_cfg("gpt2"), seed=0)
    with torch.no_grad():
        model.embed.weight[VOCAB:] = 1e4  # huge padded rows must not matter
    x = torch.randint(0, VOCAB, (1, 8))
    assert model(x).shape[-1] == VOCAB
    assert torch.isfinite(model(x, x))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_chunked_loss_equals_the_whole_logits_loss(arch: str) -> None:
    """model.loss_chunk_tokens: the same loss and gradients as the LM head over every token at once,
    with padded vocabulary rows, ignored labels and a last chunk shorter than the others."""
    from llm.model.gpt import IGNORE

    cfg = ModelConfig(architecture=arch, num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16,
                      vocab_size=300)  # fmt: skip
    whole, chunked = build_model(cfg, seed=3), build_model(dataclasses.replace(cfg, loss_chunk_tokens=7), seed=3)
    tokens = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    labels = tokens[:, 1:].clone()
    labels[0, :5] = IGNORE
    a, b = whole(tokens[:, :-1], labels), chunked(tokens[:, :-1], labels)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    a.backward()
    b.backward()
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)
