"""A training step (forward, backward, AdamW) of our GPT against a plain single-file PyTorch GPT
(written below: nn.Linear, nn.LayerNorm / RMSNorm, F.scaled_dot_product_attention,
F.cross_entropy) and transformers' model of the same shape, side by side in one process with
interleaved repeats; and our model FLOP/s as a fraction of this machine's measured matmul peak. Also
ours with the MLP's plain graph (the projection keeping the activation's output instead of
recomputing it in backward: `median_round_recompute_over_kept_mlp`, the time ratio).

  python benchmarks/model_throughput.py                       # the CPU grid (3 shapes)
  python benchmarks/model_throughput.py --shape gpt2:6:512:8:512:4
  python benchmarks/model_throughput.py --device cuda --dtype bf16 --shape gpt2:12:768:12:1024:16
  python benchmarks/model_throughput.py --smoke

A shape is arch:layers:hidden:heads:seq:batch (llama shapes use 2 KV groups). Every model uses
torch.optim.AdamW (foreach) and the same weights; the plain and transformers models are checked to
give our loss before timing, so none is fast by computing something else.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from common import report
from torch import nn

from llm.config import ModelConfig
from llm.model import activations
from llm.model.flops import model_flops_per_token
from llm.model.gpt import build_model, count_parameters
from llm.model.hf import hf_config, to_hf_state_dict
from llm.parallel.qkv import split_qkv

GRID = ["gpt2:4:256:4:256:8", "gpt2:6:512:8:512:4", "llama:6:512:8:512:4"]


# ------------------------------------------------------------------ the plain reference model
class PlainBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d, self.llama = cfg.hidden_size, cfg.head_dim, cfg.is_llama
        self.heads, self.groups, self.d = cfg.num_attention_heads, cfg.kv_groups, d
        norm = (lambda: nn.RMSNorm(h, eps=cfg.norm_eps)) if self.llama else (lambda: nn.LayerNorm(h, eps=cfg.norm_eps))
        self.ln1, self.ln2 = norm(), norm()
        self.q = nn.Linear(h, self.heads * d, bias=not self.llama)
        self.kv = nn.Linear(h, 2 * self.groups * d, bias=not self.llama)
        self.o = nn.Linear(h, h, bias=not self.llama)
        self.fc = nn.Linear(h, (2 if self.llama else 1) * cfg.ffn_size, bias=not self.llama)
        self.proj = nn.Linear(cfg.ffn_size, h, bias=not self.llama)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, h = x.shape
        y = self.ln1(x)
        q = self.q(y).view(b, s, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(y).view(b, s, 2, self.groups, self.d).permute(2, 0, 3, 1, 4)
        if rope is not None:
            cos, sin = rope
            q = q * cos + torch.cat([-q[..., self.d // 2 :], q[..., : self.d // 2]], -1) * sin
            k = k * cos + torch.cat([-k[..., self.d // 2 :], k[..., : self.d // 2]], -1) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        z = self.fc(self.ln2(x))
        if self.llama:
            gate, up = z.chunk(2, -1)
            z = F.silu(gate) * up
        else:
            z = F.gelu(z, approximate="tanh")
        return x + self.proj(z)


class PlainGPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size(), cfg.hidden_size)
        self.wpe = None if cfg.is_llama else nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps) if cfg.is_llama else nn.LayerNorm(cfg.hidden_size)
        self.head = None if cfg.tied else nn.Linear(cfg.hidden_size, cfg.padded_vocab_size(), bias=False)
        if cfg.is_llama:
            d = cfg.head_dim
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            f = torch.outer(torch.arange(cfg.seq_length, dtype=torch.float64), inv)
            emb = torch.cat([f, f], -1)
            self.register_buffer("cos", emb.cos().float(), persistent=False)
            self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        x = self.wte(ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(s, device=ids.device))
        rope = (self.cos[:s], self.sin[:s]) if self.cfg.is_llama else None  # type: ignore[index]
        for block in self.blocks:
            x = block(x, rope)
        w = self.wte.weight if self.head is None else self.head.weight
        logits = F.linear(self.ln_f(x), w[: self.cfg.vocab_size])
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


@torch.no_grad()
def load_plain(plain: PlainGPT, ours: nn.Module, cfg: ModelConfig) -> None:
    """Our weights into the plain model (our fused, group-ordered QKV split into q and kv)."""
    src = dict(ours.state_dict())
    plain.wte.weight.copy_(src["embed.weight"])
    if plain.wpe is not None:
        plain.wpe.weight.copy_(src["pos_embed.weight"])
    if plain.head is not None:
        plain.head.weight.copy_(src["lm_head.weight"])
    for name, t in (("weight", "final_norm.weight"), ("bias", "final_norm.bias")):
        if t in src:
            getattr(plain.ln_f, name).copy_(src[t])
    for i, blk in enumerate(plain.blocks):
        p = f"layers.{i}."
        for suffix in ("weight", "bias"):
            key = p + f"attention.qkv.{suffix}"
            if key not in src:
                continue
            q, k, v = split_qkv(src[key], heads=cfg.num_attention_heads, groups=cfg.kv_groups, head_dim=cfg.head_dim)
            getattr(blk.q, suffix).copy_(q.flatten(0, 1))
            getattr(blk.kv, suffix).copy_(torch.cat([k.flatten(0, 1), v.flatten(0, 1)]))
            for mine, theirs in ((blk.o, "attention.proj"), (blk.fc, "mlp.fc"), (blk.proj, "mlp.proj")):
                getattr(mine, suffix).copy_(src[p + f"{theirs}.{suffix}"])
            for mine, theirs in ((blk.ln1, "input_norm"), (blk.ln2, "post_attention_norm")):
                if p + f"{theirs}.{suffix}" in src:
                    getattr(mine, suffix).copy_(src[p + f"{theirs}.{suffix}"])


# ------------------------------------------------------------------------------ measurement
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(n: int, device: str, dtype: torch.dtype) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for i in range(12):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Runner:
    """One model, its AdamW, and its best step time over all repeats so far."""

    def __init__(self, model: nn.Module, loss: Any, device: str, dtype: torch.dtype) -> None:
        self.model, self.loss, self.device, self.dtype = model, loss, device, dtype
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.best = math.inf
        self.times: list[float] = []

    def step(self, tokens: torch.Tensor) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.loss(self.model, tokens)
        loss.backward()
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - start


def measure_shape(spec: str, args: argparse.Namespace, peak: float) -> dict:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    arch, layers, hidden, heads, seq, batch = spec.split(":")
    cfg = ModelConfig(architecture=arch, num_layers=int(layers), hidden_size=int(hidden),  # type: ignore[arg-type]
                      num_attention_heads=int(heads), seq_length=int(seq), vocab_size=args.vocab,
                      num_query_groups=2 if arch == "llama" else None)  # fmt: skip
    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    ours = build_model(cfg, seed=0).train().to(device)
    plain = PlainGPT(cfg).train().to(device)
    load_plain(plain, ours, cfg)
    hcfg = hf_config(cfg)
    hcfg._attn_implementation = "sdpa"
    hf = (LlamaForCausalLM if cfg.is_llama else GPT2LMHeadModel)(hcfg).train().to(device)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    if cfg.tied:
        hf.tie_weights()
    tokens = torch.randint(0, args.vocab, (int(batch), int(seq) + 1), device=device)

    def ours_loss(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return m(t[:, :-1], t[:, 1:])

    def plain_loss(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return m(t[:, :-1], t[:, 1:])

    def hf_loss(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return m(input_ids=t[:, :-1], labels=t[:, :-1]).loss  # transformers shifts the labels itself

    def hf_next_token_loss(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The loss over the same predictions as ours (transformers' own loss drops the last one)."""
        logits = m(input_ids=t[:, :-1]).logits
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), t[:, 1:].flatten())

    with torch.no_grad():  # all three compute the same loss on the same weights
        ref = float(ours_loss(ours, tokens))
        for name, (m, f) in {"plain": (plain, plain_loss), "hf": (hf, hf_next_token_loss)}.items():
            got = float(f(m, tokens))
            assert abs(got - ref) < 1e-3 * max(1.0, abs(ref)), f"{spec}: {name} loss {got} != ours {ref}"
    def ours_plain_mlp_loss(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """Ours with the MLP's plain graph: the projection keeps the activation's output."""
        activations.RECOMPUTE_ACTIVATION = False
        try:
            return m(t[:, :-1], t[:, 1:])
        finally:
            activations.RECOMPUTE_ACTIVATION = True

    runners = {"ours": Runner(ours, ours_loss, device, dtype), "plain": Runner(plain, plain_loss, device, dtype),
               "hf": Runner(hf, hf_loss, device, dtype),
               "ours_plain_mlp": Runner(build_model(cfg, seed=0).train().to(device), ours_plain_mlp_loss, device, dtype)}  # fmt: skip
    compile_seconds = None
    if args.compile:  # model.compile: true (each block compiled in place)
        compiled = build_model(dataclasses.replace(cfg, compile=True), seed=0).train().to(device)
        runners["ours_compiled"] = Runner(compiled, ours_loss, device, dtype)
        compile_seconds = runners["ours_compiled"].step(tokens)  # the first step compiles
    for r in runners.values():  # warm-up (allocator, AdamW state)
        r.step(tokens)
        r.step(tokens)
    order = list(runners.values())
    for i in range(args.repeats):  # interleaved, in a rotating order: drift in load hits every model alike
        for r in order[i % len(order) :] + order[: i % len(order)]:
            r.times.append(r.step(tokens))
            r.best = min(r.best, r.times[-1])
    n_tokens = int(batch) * int(seq)
    flops = model_flops_per_token(cfg, count_parameters(ours)) * n_tokens
    tps = {k: n_tokens / r.best for k, r in runners.items()}
    def paired(a: str, b: str) -> float:  # median over rounds of b's time / a's time in the same round
        return round(statistics.median(y / x for x, y in zip(runners[a].times, runners[b].times)), 3)

    out = {
        "parameters": count_parameters(ours),
        "median_round_ours_over_plain": paired("ours", "plain"),
        "median_round_ours_over_hf": paired("ours", "hf"),
        # the MLP recomputing its activation in backward (llm.model.activations) against keeping it: time
        "median_round_recompute_over_kept_mlp": paired("ours_plain_mlp", "ours"),
        "tokens_per_sec": {k: round(v) for k, v in tps.items()},
        "ours_over_plain": round(tps["ours"] / tps["plain"], 3),
        "ours_over_hf": round(tps["ours"] / tps["hf"], 3),
        "ours_model_gflops": round(flops / runners["ours"].best / 1e9, 1),
        "fraction_of_matmul_peak": round(flops / runners["ours"].best / peak, 3),
    }
    if compile_seconds is not None:
        out.update(compiled_over_plain=round(tps["ours_compiled"] / tps["plain"], 3),
                   median_round_compiled_over_plain=paired("ours_compiled", "plain"),
                   compiled_over_hf=round(tps["ours_compiled"] / tps["hf"], 3),
                   compiled_model_gflops=round(flops / runners["ours_compiled"].best / 1e9, 1),
                   compiled_fraction_of_matmul_peak=round(flops / runners["ours_compiled"].best / peak, 3),
                   first_compiled_step_seconds=round(compile_seconds, 1))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", help="arch:layers:hidden:heads:seq:batch (repeatable)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    parser.add_argument("--compile", action="store_true", help="also ours with model.compile: true")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny shapes, one repeat")
    args = parser.parse_args()
    shapes = args.shape or GRID
    if args.smoke:
        shapes, args.vocab, args.repeats = ["gpt2:1:64:2:32:2", "llama:1:64:4:32:2"], 512, 1
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n = 256 if args.smoke else (8192 if args.device == "cuda" else 2048)
    results: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "repeats": args.repeats}
    peaks = [matmul_peak(n, args.device, dtype)]
    for spec in shapes:
        results[spec] = measure_shape(spec, args, peaks[-1])
        peaks.append(matmul_peak(n, args.device, dtype))
    # The peak is the best of the measurements around the shapes (this machine's load varies); the
    # fractions are recomputed against it.
    peak = max(peaks)
    for spec in shapes:
        r = results[spec]
        for key in ("fraction_of_matmul_peak", "compiled_fraction_of_matmul_peak"):
            if key in r:
                gflops = r["ours_model_gflops"] if key.startswith("fraction") else r["compiled_model_gflops"]
                r[key] = round(gflops * 1e9 / peak, 3)
    results["matmul_peak_gflops"] = round(peak / 1e9, 1)
    report("model_throughput", results)


if __name__ == "__main__":
    main()
