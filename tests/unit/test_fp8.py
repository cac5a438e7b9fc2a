"""FP8 linear layers (train.precision: fp8) on CPU through torch's reference FP8 matmul: the matmuls
against float8 rounding done by hand, the scales, what backward keeps, and the refusals."""

from __future__ import annotations

import pytest
import torch

from llm.config import Config, ConfigError, ModelConfig, validate
from llm.engine.deepspeed_config import deepspeed_setup
from llm.model.gpt import build_model
from llm.parallel.fp8 import E4M3, E5M2, Fp8Groups, fp8_linear
from llm.parallel.layers import use_fp8
from llm.parallel.process_groups import ParallelContext


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` through float8 with the recipe's scale, written out independently: the largest power of two
    that keeps the largest magnitude within the format's range."""
    scale = 2.0 ** torch.floor(torch.log2(torch.finfo(dtype).max / t.abs().max()))
    return (t.float() * scale).to(dtype).float() / scale


def test_fp8_matmuls_are_the_float8_rounded_operands_multiplied() -> None:
    """Forward y = x W^T on e4m3 operands; backward dx = dy W and dW = dy^T x with the output gradient
    in e5m2: exactly (fp32 accumulation, exact power-of-two scales) what the rounded operands give."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g).requires_grad_(True)
    w = (torch.randn(48, 64, generator=g) * 0.02).requires_grad_(True)
    y = fp8_linear(x, w, Fp8Groups())
    upstream = torch.randn(y.shape, generator=g)
    y.backward(upstream)
    xq, wq, gq = _rounded(x.detach(), E4M3), _rounded(w.detach(), E4M3), _rounded(upstream, E5M2)
    assert torch.equal(y.detach(), xq @ wq.t())
    assert torch.equal(x.grad, gq @ wq)
    torch.testing.assert_close(w.grad, torch.einsum("bso,bsi->oi", gq, xq), rtol=1e-6, atol=0)
    exact = x.detach() @ w.detach().t()  # and float8 is not fp32: a few percent off, not more
    error = float((y.detach() - exact).norm() / exact.norm())
    assert 0.005 < error < 0.08


def test_fp8_keeps_float8_copies_for_backward_and_follows_the_input_dtype() -> None:
    """bf16 in, bf16 out (DeepSpeed's bf16 engine), and what autograd keeps for backward is the float8
    operands (half a bf16 copy's bytes) and their scales."""
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    kept: list[torch.dtype] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t):
        y = fp8_linear(x, w, Fp8Groups())
    assert y.dtype == torch.bfloat16
    assert sorted(map(str, kept)) == sorted(map(str, [E4M3, E4M3, torch.float32, torch.float32]))
    y.sum().backward()
    assert (
        x.grad is not None
        and x.grad.dtype == torch.bfloat16
        and w.grad is not None
        and w.grad.dtype == torch.bfloat16
    )
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(w.grad.float()).all()


def test_fp8_of_an_all_zero_input_is_zero() -> None:
    w = torch.randn(16, 32)
    assert torch.equal(fp8_linear(torch.zeros(16, 32), w, Fp8Groups()), torch.zeros(16, 16))


def _tiny() -> ModelConfig:
    return ModelConfig(architecture="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       seq_length=32, vocab_size=300)  # fmt: skip


def test_use_fp8_switches_the_block_linears_and_not_the_head() -> None:
    model = build_model(_tiny(), seed=0)
    assert use_fp8(model, ParallelContext.single()) == []
    switched = sorted(n for n, m in model.named_modules() if getattr(m, "fp8", None) is not None)
    assert switched == [f"layers.{i}.{part}" for i in range(2)
                        for part in ("attention.proj", "attention.qkv", "mlp.fc", "mlp.proj")]  # fmt: skip
    tokens = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    reference = build_model(_tiny(), seed=0)
    loss, ref = model(tokens[:, :-1], tokens[:, 1:]), reference(tokens[:, :-1], tokens[:, 1:])
    assert loss.item() != ref.item() and abs(loss.item() - ref.item()) / ref.item() < 1e-2


def test_use_fp8_names_layers_whose_dimensions_are_not_multiples_of_16() -> None:
    cfg = _tiny()
    cfg.ffn_hidden_size = 200
    problems = use_fp8(build_model(cfg, seed=0), ParallelContext.single())
    assert problems == [  # [gate | up] is 400 rows: a multiple of 16; the projection's 200 inputs are not
        f"layers.{i}.mlp.proj is 64 x 200 on this rank, not a multiple of 16 in both dimensions"
        for i in range(2)
    ]


def test_fp8_is_refused_on_cpu_in_one_line_unless_asked_for_a_test() -> None:
    cfg = Config()
    cfg.train.precision = "fp8"
    with pytest.raises(ConfigError, match=r"^train.precision: fp8 needs an NVIDIA GPU with FP8 tensor cores .*"
                                          r"this run is on CPU.*use train.precision: bf16$"):  # fmt: skip
        deepspeed_setup(cfg, world_size=1, cuda=False)
    cfg.debug.fp8_on_cpu = True
    ds, _ = deepspeed_setup(cfg, world_size=1, cuda=False)
    assert ds["bf16"] == {"enabled": True}  # the engine runs bf16 mixed precision around the FP8 matmuls


def test_fp8_needs_a_multiple_of_16_tokens_per_rank() -> None:
    cfg = Config()
    cfg.train.precision = "fp8"
    cfg.model.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size = 100, 1, 1
    with pytest.raises(ConfigError, match=r"tokens per micro-batch .* = 100\) to be a multiple of 16"):
        validate(cfg)
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 4, 4
    validate(cfg)


def test_fp8_needs_whole_kv_groups_per_tensor_parallel_rank() -> None:
    cfg = Config()
    cfg.train.precision = "fp8"
    cfg.model.architecture, cfg.model.num_attention_heads, cfg.model.num_query_groups = "llama", 12, 2
    cfg.parallel.tensor_model_parallel_size = 4
    with pytest.raises(ConfigError, match=r"whole KV groups .*num_query_groups = 2 divisible by .*size = 4"):
        validate(cfg)
    cfg.parallel.tensor_model_parallel_size = 2
    validate(cfg)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_fp8_with_the_activation_inside_is_the_same_bits_and_keeps_the_activations_input(kind: str) -> None:
    """The MLP's projection in FP8 takes fc's output h and applies the activation itself: the output
    and both gradients are bitwise those of the activation applied first, and what it keeps is h (which
    the activation keeps anyway), not the activation's float8 copy: backward casts the recomputed
    activation again at forward's scale."""
    from llm.model.activations import activate, pair

    g = torch.Generator().manual_seed(3)
    h = (2 * torch.randn(2, 16, 64 if kind == "swiglu" else 32, generator=g)).to(torch.bfloat16).requires_grad_(True)
    w = (0.05 * torch.randn(48, 32, generator=g)).to(torch.bfloat16).requires_grad_(True)
    upstream = torch.randn(2, 16, 48, generator=g).to(torch.bfloat16)
    want = fp8_linear(activate(h, kind), w, Fp8Groups())
    want_grads = torch.autograd.grad(want, (h, w), upstream)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = fp8_linear(h, w, Fp8Groups(), pair(kind))
    got_grads = torch.autograd.grad(got, (h, w), upstream)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads, strict=True))
    assert any(t is h for t in kept) and sorted(str(t.dtype) for t in kept if t is not h) == sorted(
        map(str, [E4M3, torch.float32, torch.float32])
    )  # h (and the activation's own h), the weight's float8 copy and the two scales
