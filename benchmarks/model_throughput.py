"""Forward+backward tokens/s of our GPT against transformers' GPT2LMHeadModel of the same shape,
measured in the same run, and achieved FLOP/s as a fraction of this machine's fp32 matmul peak.

  python benchmarks/model_throughput.py [--layers 6 --hidden 512 --heads 8 --seq 512 --batch 4] [--smoke]
"""

from __future__ import annotations

import argparse

import torch
from common import best_of, report

from llm.config import ModelConfig
from llm.model.flops import model_flops_per_token
from llm.model.gpt import build_model, count_parameters
from llm.model.hf import hf_config, to_hf_state_dict


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(n: int, repeats: int, device: str, dtype: torch.dtype) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def mm() -> None:
        torch.mm(a, b)
        _sync(device)

    return 2 * n**3 / best_of(mm, repeats=repeats, warmup=2)


def step_time(model: torch.nn.Module, tokens: torch.Tensor, hf: bool, repeats: int, dtype: torch.dtype) -> float:
    device = tokens.device.type

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            if hf:
                loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            else:
                loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        _sync(device)

    return best_of(step, repeats=repeats, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny shape, one repeat")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.smoke:
        args.layers, args.hidden, args.heads, args.seq, args.batch, args.vocab, args.repeats = 1, 64, 2, 32, 2, 512, 1
    from transformers import GPT2LMHeadModel

    cfg = ModelConfig(architecture="gpt2", num_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=args.heads, seq_length=args.seq, vocab_size=args.vocab)  # fmt: skip
    ours = build_model(cfg, seed=0).train().to(args.device)
    hcfg = hf_config(cfg)
    hcfg._attn_implementation = "sdpa"
    theirs = GPT2LMHeadModel(hcfg).train().to(args.device)
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
    n_tokens = args.batch * args.seq
    results = {}
    # Interleave to share any drift in machine load fairly.
    t_ours, t_hf = float("inf"), float("inf")
    for _ in range(2):
        t_ours = min(t_ours, step_time(ours, tokens, False, args.repeats, dtype))
        t_hf = min(t_hf, step_time(theirs, tokens, True, args.repeats, dtype))
    flops = model_flops_per_token(cfg, count_parameters(ours)) * n_tokens
    n = 256 if args.smoke else (8192 if args.device == "cuda" else 2048)
    peak = matmul_peak(n, 10, args.device, dtype)
    results = {
        "shape": {k: v for k, v in vars(args).items() if k != "smoke"},
        "parameters": count_parameters(ours),
        "ours_tokens_per_sec": round(n_tokens / t_ours),
        "hf_gpt2_tokens_per_sec": round(n_tokens / t_hf),
        "ours_over_hf": round(t_hf / t_ours, 3),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "ours_model_gflops": round(flops / t_ours / 1e9, 1),
        "fraction_of_matmul_peak": round(flops / t_ours / peak, 3),
    }
    report("model_throughput", results)


if __name__ == "__main__":
    main()
