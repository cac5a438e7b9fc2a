"""FP8 linear layers (train.precision: fp8) on CPU through torch's reference FP8 matmul: the matmuls
against float8 rounding done by hand, the scales, what backward keeps, and the refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm.config import Config, ConfigError, ModelConfig, validate
from llm.engine.deepspeed_config import deepspeed_setup
from llm.model.gpt import build_model
from llm.parallel.fp8 import E4M3, E5M2, Fp8Groups, fp8_grouped_linear, fp8_linear
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


def test_fp8_keeps_the_inputs_float8_copy_and_the_weight_itself_and_follows_the_input_dtype() -> None:
    """bf16 in, bf16 out (DeepSpeed's bf16 engine), and what autograd keeps for backward is the input's
    float8 copy (half a bf16 copy's bytes), the weight parameter itself (no copy: backward casts it
    again at the saved scale) and the two scales."""
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = fp8_linear(x, w, Fp8Groups())
    assert y.dtype == torch.bfloat16
    assert sum(t is w for t in kept) == 1
    assert sorted(str(t.dtype) for t in kept if t is not w) == sorted(map(str, [E4M3, torch.float32, torch.float32]))
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
    assert any(t is h for t in kept) and any(t is w for t in kept)  # h (and the activation's own h), w itself
    assert sorted(str(t.dtype) for t in kept if t is not h and t is not w) == sorted(
        map(str, [torch.float32, torch.float32])
    )  # and the two scales: no float8 copy of the activation or of the weight


# ---- the routed experts: row-wise scales ------------------------------------------------------------
def _rows_rounded(t: torch.Tensor) -> torch.Tensor:
    """Each row of `t` through e4m3 with its own scale (the largest power of two keeping the row's
    largest magnitude within range), written out independently."""
    scale = 2.0 ** torch.floor(torch.log2(torch.finfo(E4M3).max / t.abs().amax(dim=1, keepdim=True)))
    return (t.float() * scale).to(E4M3).float() / scale


def _expert_rows(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose magnitudes span twelve orders (a per-tensor scale would flush the small ones to zero)
    and an expert's weight."""
    x = torch.randn(40, 64, generator=generator) * torch.logspace(-6, 6, 40).unsqueeze(1)
    return x.requires_grad_(True), (0.05 * torch.randn(48, 64, generator=generator)).requires_grad_(True)


def _one_expert(x: torch.Tensor, w: torch.Tensor, activation: Any = None) -> torch.Tensor:
    """fp8_grouped_linear with one expert holding every row."""
    return fp8_grouped_linear(x, w.unsqueeze(0), torch.tensor([x.shape[0]], dtype=torch.int32), activation)


def test_expert_fp8_is_each_rows_float8_rounding_multiplied() -> None:
    """An expert's layer (fp8_grouped_linear): y = x W^T and dx = dy W on e4m3 operands, a scale for each
    row of x and of dy and one for W, exactly what the rounded operands give in fp32; dW = dy^T x from
    the rounded x and the unrounded dy. Every row keeps float8's relative precision whatever its size."""
    g = torch.Generator().manual_seed(0)
    x, w = _expert_rows(g)
    y = _one_expert(x, w)
    upstream = torch.randn(y.shape, generator=g) * torch.logspace(4, -4, 40).unsqueeze(1)
    y.backward(upstream)
    xq, wq, gq = _rows_rounded(x.detach()), _rounded(w.detach(), E4M3), _rows_rounded(upstream)
    assert torch.equal(y.detach(), xq @ wq.t())
    assert torch.equal(x.grad, gq @ wq)
    torch.testing.assert_close(w.grad, upstream.t() @ xq, rtol=1e-6, atol=0)
    exact = x.detach() @ w.detach().t()
    row_error = (y.detach() - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(row_error.max()) < 0.1 and float(row_error.min()) > 0  # float8 at every magnitude


def test_expert_fp8_does_not_depend_on_how_the_rows_are_grouped() -> None:
    """The rows of one expert in one call or in two (as an expert-parallel layout groups other ranks'
    tokens with this rank's, and one process each micro-batch's alone): the same outputs and input
    gradients bit for bit, weight gradients that add up to the same. And an expert with no rows."""
    g = torch.Generator().manual_seed(1)
    x, w = _expert_rows(g)
    upstream = torch.randn(40, 48, generator=g)
    whole = _one_expert(x, w)
    dx, dw = torch.autograd.grad(whole, (x, w), upstream)
    parts = [_one_expert(part, w) for part in x.split([13, 27])]
    part_grads = [torch.autograd.grad(p, (x, w), u) for p, u in zip(parts, upstream.split([13, 27]), strict=True)]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(part_grads[0][0] + part_grads[1][0], dx)  # each part's rows are zero in the other
    torch.testing.assert_close(part_grads[0][1] + part_grads[1][1], dw, rtol=1e-5, atol=1e-6 * float(dw.abs().max()))
    empty = _one_expert(torch.zeros(0, 64, requires_grad=True), w)
    assert empty.shape == (0, 48)
    assert torch.equal(torch.autograd.grad(empty.sum(), w)[0], torch.zeros_like(w))


def test_grouped_experts_in_fp8_are_each_expert_alone() -> None:
    """Several experts in one call (one grouped GEMM on Hopper), one without rows, weights of different
    sizes: each expert's rows give what that expert alone gives (its own weight scale), gradients
    included."""
    g = torch.Generator().manual_seed(2)
    counts = [12, 0, 40, 5]
    x = torch.randn(sum(counts), 64, generator=g).requires_grad_(True)
    w = (torch.randn(4, 48, 64, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 0.02]).view(4, 1, 1)).requires_grad_(True)
    upstream = torch.randn(sum(counts), 48, generator=g)
    y = fp8_grouped_linear(x, w, torch.tensor(counts).cumsum(0, dtype=torch.int32))
    dx, dw = torch.autograd.grad(y, (x, w), upstream)
    for e, (rows, up) in enumerate(zip(x.split(counts), upstream.split(counts), strict=True)):
        alone = _one_expert(rows, w[e])
        want_dx, want_dw = torch.autograd.grad(alone, (x, w), up)
        assert torch.equal(y.split(counts)[e], alone)
        assert torch.equal(dx.split(counts)[e], want_dx.split(counts)[e])
        torch.testing.assert_close(dw[e], want_dw[e], rtol=1e-6, atol=0)
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))


def test_grouped_fp8_hands_hoppers_grouped_gemm_what_it_takes() -> None:
    """On Hopper the experts' FP8 layers call torch._scaled_grouped_mm (forward and input gradient) and
    torch._grouped_mm (weight gradient). Their meta-device versions carry the CUDA kernels' checks
    (float8 e4m3 operands, row-major A and column-major B, 16-byte-aligned strides, per-row and
    per-expert-column float32 scales, int32 offsets, bf16 out): forward and backward on the meta
    device pass them, with the shapes the CPU path gives."""
    from llm.model.activations import pair

    for activation in (None, pair("swiglu")):
        k = 128 if activation else 64
        x = torch.empty(200, k, dtype=torch.bfloat16, device="meta", requires_grad=True)
        w = torch.empty(4, 96, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
        offsets = torch.empty(4, dtype=torch.int32, device="meta")
        y = fp8_grouped_linear(x, w, offsets, activation)
        dx, dw = torch.autograd.grad(y, (x, w), torch.empty_like(y))
        assert (y.shape, dx.shape, dw.shape) == ((200, 96), x.shape, w.shape)
        assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_expert_fp8_with_the_activation_inside_is_the_same_bits_and_keeps_the_activations_input(kind: str) -> None:
    """As the dense layers': the expert's projection applies the activation itself, keeps fc's output h
    and the weight itself, and backward casts the recomputed activation at forward's row scales."""
    from llm.model.activations import activate, pair

    g = torch.Generator().manual_seed(3)
    h = (2 * torch.randn(24, 64 if kind == "swiglu" else 32, generator=g)).to(torch.bfloat16).requires_grad_(True)
    w = (0.05 * torch.randn(1, 48, 32, generator=g)).to(torch.bfloat16).requires_grad_(True)
    upstream = torch.randn(24, 48, generator=g).to(torch.bfloat16)
    offsets = torch.tensor([24], dtype=torch.int32)
    want = fp8_grouped_linear(activate(h, kind), w, offsets)
    want_grads = torch.autograd.grad(want, (h, w), upstream)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = fp8_grouped_linear(h, w, offsets, pair(kind))
    got_grads = torch.autograd.grad(got, (h, w), upstream)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads, strict=True))
    assert any(t is h for t in kept) and any(t is w for t in kept)
    others = [t for t in kept if t is not h and t is not w]  # the row scales, the weight's, the offsets
    assert sorted((str(t.dtype), tuple(t.shape)) for t in others) == [
        ("torch.float32", (1, 1, 1)), ("torch.float32", (24, 1)), ("torch.int32", (1,))]  # fmt: skip


def _tiny_moe(ffn: int = 32) -> ModelConfig:
    cfg = _tiny()
    cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size = 4, 2, ffn
    return cfg


def test_use_fp8_switches_the_routed_experts_and_not_the_router() -> None:
    """An MoE model: the experts' two layers run in float8 (row-wise), the router and the head do not;
    the loss moves by float8 rounding only."""
    model = build_model(_tiny_moe(), seed=0)
    assert use_fp8(model, ParallelContext.single()) == []
    switched = sorted(n for n, m in model.named_modules() if getattr(m, "fp8", None) not in (None, False))
    assert switched == [f"layers.{i}.{part}" for i in range(2)
                        for part in ("attention.proj", "attention.qkv", "mlp.experts.fc", "mlp.experts.proj")]  # fmt: skip
    tokens = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    reference = build_model(_tiny_moe(), seed=0)
    dense = build_model(_tiny_moe(), seed=0)
    assert use_fp8(dense, ParallelContext.single()) == []
    for layer in dense.layers:  # the experts back in full precision, the attention still in float8
        layer.mlp.experts.fc.fp8 = layer.mlp.experts.proj.fp8 = False
    loss, ref, attention_only = (m(tokens[:, :-1], tokens[:, 1:]).item() for m in (model, reference, dense))
    assert loss != attention_only != ref and abs(loss - ref) / ref < 1e-2
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    expert = model.layers[0].mlp.experts.fc.weight.grad
    assert expert is not None and torch.isfinite(expert).all() and expert.abs().sum() > 0


def test_use_fp8_names_experts_whose_dimensions_are_not_multiples_of_16() -> None:
    from llm.training.pretrain import switch_to_fp8

    problems = use_fp8(build_model(_tiny_moe(ffn=40), seed=0), ParallelContext.single())
    assert problems == [  # the experts' [gate | up] is 80 x 64; their projection's 40 inputs are not
        f"layers.{i}.mlp.experts.proj is 64 x 40 on this rank, not a multiple of 16 in both dimensions"
        for i in range(2)
    ]
    with pytest.raises(ConfigError, match=r"^train.precision: fp8 needs .*: layers.0.mlp.experts.proj is 64 x 40 .*"
                                          r"\(and 1 more\); .*model.moe_ffn_hidden_size.* or use train.precision: bf16$"):  # fmt: skip
        switch_to_fp8(build_model(_tiny_moe(ffn=40), seed=0), ParallelContext.single())


@pytest.mark.parametrize("changes", [
    {}, {"ffn_hidden_size": 200}, {"ffn_hidden_size": 232}, {"architecture": "gpt2", "num_query_groups": None, "ffn_hidden_size": 200},
    {"hidden_size": 72, "num_attention_heads": 4}, {"num_attention_heads": 8, "num_query_groups": 1},
    {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 40},
    {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 24},
    {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "moe_layer_freq": [0, 1],
     "ffn_hidden_size": 200},
    {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "moe_layer_freq": [1, 1],
     "ffn_hidden_size": 200},
])  # fmt: skip
def test_the_config_check_refuses_fp8_where_the_layers_would(changes: dict[str, Any]) -> None:
    """The config check's shape rule (llm.config.fp8_layout_problem, which the planner uses too) says
    no exactly where the built model's layers cannot switch to float8, naming the layer's kind and size."""
    from llm.config import fp8_layout_problem

    model_cfg = _tiny()
    for key, value in changes.items():
        setattr(model_cfg, key, value)
    layer_problems = use_fp8(build_model(model_cfg, seed=0), ParallelContext.single())
    problem = fp8_layout_problem(model_cfg, tp=1, cp=1, micro_batch_size=1)
    assert (problem is None) == (layer_problems == []), (problem, layer_problems)
    if problem:
        size = layer_problems[0].split(" is ")[1].split(" on ")[0]  # "64 x 200"
        assert f" is {size} on each tensor-parallel rank" in problem and problem.endswith("train.precision: bf16")
        cfg = Config()
        cfg.model, cfg.train.precision = model_cfg, "fp8"
        cfg.train.micro_batch_size = cfg.train.global_batch_size = 1
        with pytest.raises(ConfigError, match=r"^train.precision: fp8 needs the linear layers' dimensions"):
            validate(cfg)
