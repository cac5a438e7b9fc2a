"""Opt-in GPU checks (marked `gpu`; skipped where no CUDA device exists, never counted as CPU coverage)."""

from __future__ import annotations

from pathlib import Path

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


def test_grouped_gemm_experts_match_the_loop_on_cuda() -> None:
    """The bf16 grouped-GEMM path of the experts (torch._grouped_mm) against the per-expert loop on the
    same weights and rows, forward and backward, with an expert that receives no rows."""
    import llm.model.moe as moe
    from llm.parallel.process_groups import ParallelContext

    cfg = ModelConfig(architecture="llama", num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=128,
                      vocab_size=1000, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=512)  # fmt: skip
    experts = moe.Experts(cfg, ParallelContext.single()).cuda().to(torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    counts = torch.tensor([64, 0, 16, 128, 32, 48, 80, 16], device="cuda")
    rows = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = []
    for grouped in (True, False):
        moe.USE_GROUPED_MM = grouped
        try:
            out = experts(rows, counts)
        finally:
            moe.USE_GROUPED_MM = True
        grads = torch.autograd.grad(out.float().square().sum(), [rows, *experts.parameters()])
        results.append((out.float(), [g.float() for g in grads]))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    for x, y in zip(ga, gb):
        assert (x - y).abs().max() <= 3e-2 * y.abs().max() + 1e-6


def _block_check(device: str, dtype: torch.dtype, tol: float) -> None:
    """One ring block through torch's fused kernel (`_block_forward/_block_backward`) against explicit
    attention: output, log-sum-exp and gradients, causal over equal lengths and whole over fewer keys."""
    from llm.parallel.cp_attention import _block_backward, _block_forward

    gen = torch.Generator(device).manual_seed(0)
    for causal, sk in ((True, 64), (False, 32)):
        q = torch.randn(2, 4, 64, 32, device=device, generator=gen).to(dtype).requires_grad_()
        k, v = (torch.randn(2, 4, sk, 32, device=device, generator=gen).to(dtype).requires_grad_() for _ in range(2))
        scores = (q.float() @ k.float().transpose(-2, -1)) * 32**-0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(64, sk, dtype=torch.bool, device=device).tril(), float("-inf"))
        ref_lse = torch.logsumexp(scores, dim=-1)
        ref = torch.softmax(scores, dim=-1) @ v.float()
        dout = torch.randn(ref.shape, device=device, generator=gen).to(dtype)
        ref.backward(dout.float())
        out, lse, saved = _block_forward(q.detach(), k.detach(), v.detach(), causal, 32**-0.5)
        torch.testing.assert_close(out.float(), ref.detach(), rtol=0, atol=tol)
        torch.testing.assert_close(lse, ref_lse.detach(), rtol=0, atol=tol)
        grads = _block_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, causal, 32**-0.5, saved)
        for got, want in zip(grads, (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol * 10)


def test_ring_attention_blocks_through_flash_attention_match_explicit_attention_on_cuda() -> None:
    _block_check("cuda", torch.bfloat16, 2e-2)


def test_the_chunked_loss_tracks_the_whole_logits_in_bf16_on_cuda() -> None:
    """model.loss_chunk_tokens in bf16 on a GPU: the loss and the output layer's gradient as the whole
    logits give them, within bf16's precision."""
    import dataclasses

    cfg = ModelConfig(architecture="llama", num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=128,
                      vocab_size=5000)  # fmt: skip
    whole = build_model(cfg, seed=0).cuda().to(torch.bfloat16)
    chunked = build_model(dataclasses.replace(cfg, loss_chunk_tokens=96), seed=0).cuda().to(torch.bfloat16)
    tokens = torch.randint(0, 5000, (4, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    a, b = whole(tokens[:, :-1], tokens[:, 1:]), chunked(tokens[:, :-1], tokens[:, 1:])
    assert abs(a.item() - b.item()) / a.item() < 1e-2
    a.backward()
    b.backward()
    ga, gb = whole.lm_head.weight.grad.float(), chunked.lm_head.weight.grad.float()
    assert torch.isfinite(gb).all() and (ga - gb).norm() / ga.norm() < 5e-2


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)
def test_fp8_linear_through_cublas_matches_the_float8_rounded_operands_on_cuda() -> None:
    """train.precision: fp8's matmuls through cuBLAS's FP8 GEMMs (bf16 in and out): forward and both
    backward matmuls against the float8-rounded operands multiplied in fp32, within bf16's rounding of
    the output; and the CPU reference kernel gives the same."""
    from llm.parallel.fp8 import E4M3, E5M2, Fp8Groups, fp8_linear

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(4, 256, 512, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(768, 512, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
    y = fp8_linear(x, w, Fp8Groups())
    upstream = torch.randn(y.shape, device="cuda", generator=g).to(torch.bfloat16)
    y.backward(upstream)

    def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scale = 2.0 ** torch.floor(torch.log2(torch.finfo(dtype).max / t.float().abs().max()))
        return (t.float() * scale).to(dtype).float() / scale

    xq, wq, gq = rounded(x.detach(), E4M3), rounded(w.detach(), E4M3), rounded(upstream, E5M2)
    for got, want in ((y, xq @ wq.t()), (x.grad, gq @ wq), (w.grad, torch.einsum("bso,bsi->oi", gq, xq))):
        err = (got.float() - want).norm() / want.norm()
        assert err < 4e-3, err  # bf16 output rounding: about 2e-3
    on_cpu = fp8_linear(x.detach().cpu(), w.detach().cpu(), Fp8Groups())
    torch.testing.assert_close(y.detach().cpu(), on_cpu, rtol=1.6e-2, atol=1e-2)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores"
)
def test_fp8_experts_through_row_wise_fp8_gemms_match_the_rounded_operands_on_cuda() -> None:
    """The routed experts' FP8 layers (row-wise scales; on Hopper torch._scaled_grouped_mm and, for the
    weight gradient, torch._grouped_mm, bf16 out) against each row's float8 rounding multiplied in
    fp32, with rows spanning 2^20 in size; then a whole FP8 expert layer (eight experts in one grouped
    GEMM, one without rows) forward and backward on CUDA against the same layer on CPU (group by group
    through _scaled_mm); and the grouped FP8 GEMM against the same groups one by one on the GPU."""
    import llm.model.moe as moe
    from llm.parallel.fp8 import E4M3, fp8_grouped_linear
    from llm.parallel.layers import use_fp8
    from llm.parallel.process_groups import ParallelContext

    g = torch.Generator("cuda").manual_seed(0)
    sizes = 2.0 ** torch.linspace(-10, 10, 384, device="cuda").round().unsqueeze(1)
    x = (torch.randn(384, 512, device="cuda", generator=g) * sizes).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(768, 512, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
    y = fp8_grouped_linear(x, w.unsqueeze(0), torch.tensor([384], dtype=torch.int32, device="cuda"))
    upstream = torch.randn(y.shape, device="cuda", generator=g).to(torch.bfloat16)
    y.backward(upstream)

    def rounded(t: torch.Tensor, rows: bool) -> torch.Tensor:
        amax = t.float().abs().amax(dim=1, keepdim=True) if rows else t.float().abs().max()
        scale = 2.0 ** torch.floor(torch.log2(torch.finfo(E4M3).max / amax))
        return (t.float() * scale).to(E4M3).float() / scale

    xq, wq, gq = rounded(x.detach(), True), rounded(w.detach(), False), rounded(upstream, True)
    for got, want in ((y, xq @ wq.t()), (x.grad, gq @ wq), (w.grad, upstream.float().t() @ xq)):
        rows = (got.float() - want).norm(dim=1) / want.norm(dim=1).clamp(min=1e-30)
        assert rows.max() < 8e-3, rows.max()  # bf16 output rounding, row by row

    cfg = ModelConfig(architecture="llama", num_layers=1, hidden_size=256, num_attention_heads=4, seq_length=128,
                      vocab_size=1000, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=512)  # fmt: skip
    counts = torch.tensor([64, 0, 16, 128, 32, 48, 80, 16])
    results = []
    for device in ("cuda", "cpu"):
        experts = moe.Experts(cfg, ParallelContext.single())
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        experts = experts.to(device, torch.bfloat16)
        assert use_fp8(experts, ParallelContext.single()) == []
        rows = torch.randn(int(counts.sum()), 256, generator=torch.Generator().manual_seed(2))
        rows = rows.to(device, torch.bfloat16).requires_grad_(True)
        out = experts(rows, counts.to(device))
        grads = torch.autograd.grad(out.float().square().sum(), [rows, *experts.parameters()])
        results.append([t.float().cpu() for t in (out, *grads)])
    for a, b in zip(*results, strict=True):
        assert torch.isfinite(a).all() and (a - b).norm() <= 2e-2 * b.norm()
    # on Hopper: the grouped FP8 GEMM against the same groups one by one through _scaled_mm, on the GPU
    import llm.parallel.fp8 as fp8

    offsets = torch.tensor([64, 64, 200, 384], dtype=torch.int32, device="cuda")
    xg = (torch.randn(384, 512, device="cuda", generator=g) * sizes).to(torch.bfloat16).requires_grad_(True)
    wg = (torch.randn(4, 768, 512, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
    up = torch.randn(384, 768, device="cuda", generator=g).to(torch.bfloat16)
    both = []
    for grouped in (True, False):
        fp8.GROUPED_FP8_GEMM = grouped
        try:
            yg = fp8_grouped_linear(xg, wg, offsets)
            both.append([yg, *torch.autograd.grad(yg, (xg, wg), up)])
        finally:
            fp8.GROUPED_FP8_GEMM = True
    for a, b in zip(*both, strict=True):
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm() + 1e-6


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_the_planner_does_not_underestimate_what_a_block_keeps_on_cuda(architecture: str) -> None:
    """The planner's per-layer activations (exact on CPU, tests/unit/test_planner.py) against what one
    bf16 block keeps on a GPU, where SDPA runs flash attention, LayerNorm keeps float32 statistics
    (16 bytes per token for the two norms, 8 on CPU in bf16) and RMSNorm may run torch's fused kernel
    (its input and rstd, 6 h bytes per token and norm fewer than the CPU composite's float32 copies).
    So: at most the estimate plus the statistics, at least the estimate less the fused norms' saving.
    The numbers are printed for docs/benchmarks.md."""
    from llm.config import load_config
    from llm.model.gpt import build_model
    from llm.planner.memory import Layout, layer_activation_bytes
    from tests.unit.test_planner import SMALL, block_saved_bytes

    extra = ["model.num_query_groups=2"] if architecture == "llama" else []
    cfg = load_config("configs/tiny_cpu.yaml", [*SMALL, f"model.architecture={architecture}", *extra,
                                                "model.hidden_size=256", "model.seq_length=256"])  # fmt: skip
    model = build_model(cfg.model, seed=1).cuda().to(torch.bfloat16)
    measured = block_saved_bytes(model, cfg, batch=2)
    layout = Layout(tp=1, pp=1, dp=1, zero=0, micro_batch_size=2)
    estimate = layer_activation_bytes(cfg.model, layout, "bf16", cfg.model.seq_length)
    print(f"{architecture}: CUDA block keeps {measured} bytes, the planner estimates {estimate:.0f}")
    tokens, h = 2 * cfg.model.seq_length, cfg.model.hidden_size
    fused_norms = 2 * 6 * h * tokens if architecture == "llama" else 0
    assert estimate - fused_norms - 1024 <= measured <= estimate + 16 * tokens + 1024, (measured, estimate)


def test_an_async_save_of_cuda_tensors_is_pinned_and_writes_the_sync_saves_bytes(tmp_path: Path) -> None:
    """checkpoint.async_save on a GPU: the host copies go into page-locked shared memory, made on a
    stream of their own after every kernel the training stream had queued before the save (here a
    change of the weights queued behind long matmuls), hold the values at the save while training goes
    on after before_update, and the writer process writes the bytes torch.save of the CUDA state dict
    writes (each storage's device recorded as the synchronous save records it; the zip format, as
    DeepSpeed writes: the legacy one names storages by their address)."""
    from llm.checkpoint import writer
    from llm.checkpoint.background import BackgroundSave, WriterProcess
    from llm.parallel.process_groups import ParallelContext

    w = torch.randn(256, 64, device="cuda")
    state = {"w": w, "view": w[2:5], "exp_avg": torch.randn(1000, device="cuda"), "ids": torch.arange(4), "step": 7}
    background, process = BackgroundSave(ParallelContext.single()), WriterProcess()
    written: list[dict] = []
    try:
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):  # the training stream busy for a while
            busy = busy @ busy.T / 4096
        w.mul_(2.0)  # queued behind the matmuls: the copy must see it
        copied, devices = background.copy(state)
        assert copied["w"].is_pinned() and copied["exp_avg"].is_pinned() and not copied["w"].is_cuda
        background.start(lambda ctx: written.append(process.save(copied, str(tmp_path / "async.pt"), zipfile=True,
                                                                 durable=True, devices=devices)), tmp_path)  # fmt: skip
        background.before_update()
        w.add_(1.0)  # the optimizer step: after the copy
        assert background.wait() and written
        w.sub_(1.0)
        writer.write(state, tmp_path / "sync.pt", durable=True, zipfile=True)
        assert (tmp_path / "async.pt").read_bytes() == (tmp_path / "sync.pt").read_bytes()
    finally:
        process.process.kill()
