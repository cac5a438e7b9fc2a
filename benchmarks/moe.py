"""Mixture-of-experts costs on CPU.

  python benchmarks/moe.py [--layers 4 --hidden 256 --seq 256 --batch 8 --experts 8 --topk 2] [--smoke]

1. All-to-all bytes: one MoE layer at expert parallelism 2 (2 gloo processes), forward and backward
   of a batch of this rank's tokens. The bytes each rank hands to `all_to_all_single` that go to the
   other rank are counted by wrapping torch.distributed's collective (the rows for its own experts
   stay), per token of this rank, against the formula: top-k x hidden x dtype bytes x 2 directions
   x (EP - 1) / EP per direction pair (dispatch and combine; backward repeats both). The token
   counts exchanged first are reported apart.
2. Step cost: one training step (forward, backward, AdamW) of a GPT whose blocks are MoE (E experts of
   F / k, top-k: the active MLP parameters of the dense model) against the dense GPT with MLP F, same
   tokens, one process (EP 1): routing, sorting and the per-expert loop are the difference.

  python benchmarks/moe.py --device cuda     (benchmarks/gpu_check.sh runs it)

On a GPU instead: one MoE layer's forward + backward in bf16 at a DeepSeek/Qwen-like shape (hidden
2048, 64 experts of 1408, top-6, 16k tokens), the experts as grouped GEMMs (torch._grouped_mm)
against the per-expert loop, and the TFLOP/s and MFU (989 TFLOP/s peak) of the grouped path counted
by active parameters: 6 x (router + top-k experts) x tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import best_of, report

from llm.config import ModelConfig
from llm.model.flops import active_params, total_params
from llm.model.gpt import build_model, parameter_groups
from llm.model.moe import moe_layers
from llm.parallel.process_groups import ParallelContext

SENT = {"rows": 0, "counts": 0}


def _count_all_to_all() -> None:
    """Wraps all_to_all_single: the bytes of the input chunks this rank sends to other ranks (rows of
    tokens; 1-d inputs are the token counts)."""
    original = dist.all_to_all_single

    def counted(output: torch.Tensor, input: torch.Tensor, output_split_sizes: Any = None,
                input_split_sizes: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        group = kwargs.get("group")
        size, me = dist.get_world_size(group), dist.get_rank(group)
        splits = input_split_sizes or [input.shape[0] // size] * size
        row_bytes = input[0].numel() * input.element_size()
        away = sum(n for j, n in enumerate(splits) if j != me)
        SENT["rows" if input.ndim > 1 else "counts"] += away * row_bytes
        return original(output, input, output_split_sizes, input_split_sizes, **kwargs)

    dist.all_to_all_single = counted  # type: ignore[assignment]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg(args: argparse.Namespace, *, moe: bool) -> ModelConfig:
    extra: dict[str, Any] = {"ffn_hidden_size": args.ffn}
    if moe:
        extra.update(num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.ffn // args.topk)
    return ModelConfig(architecture="llama", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                       seq_length=args.seq, vocab_size=8192, **extra)  # fmt: skip


def _exchange_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = ParallelContext.build(ep=world)
    cfg = _cfg(args, moe=True)
    layer = moe_layers(build_model(dataclasses.replace(cfg, num_layers=1), seed=0, ctx=ctx))[0][1]
    x = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    layer(x).sum().backward()  # warm-up
    _count_all_to_all()
    y = layer(x)
    forward = dict(SENT)
    y.sum().backward()
    if rank == 0:
        out.update(forward=forward, total=dict(SENT))
    ctx.shutdown()  # meet, then tear down: a rank leaving while another still uses gloo can abort it
    os._exit(0)  # as scripts/pretrain.py: interpreter finalization now and then aborts in gloo's threads


def _step_seconds(cfg: ModelConfig, args: argparse.Namespace) -> float:
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4)
    tokens = torch.randint(0, 8192, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()

    return best_of(step, repeats=args.repeats)


def _gpu(args: argparse.Namespace) -> dict[str, Any]:
    import llm.model.moe as moe

    cfg = ModelConfig(architecture="llama", num_layers=1, hidden_size=2048, num_attention_heads=16, seq_length=4096,
                      vocab_size=8192, num_experts=64, moe_router_topk=6, moe_ffn_hidden_size=1408)  # fmt: skip
    layer = moe_layers(build_model(cfg, seed=0))[0][1].cuda().to(torch.bfloat16)
    x = torch.randn(4, 4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    active = 64 * 2048 + 6 * 3 * 2048 * 1408  # router + top-k SwiGLU experts
    flops = 6.0 * active * x.shape[0] * x.shape[1]
    out: dict[str, Any] = {"shape": "hidden 2048, 64 experts x 1408, top-6, 16384 tokens, bf16"}
    for name, grouped in (("grouped_mm", True), ("loop", False)):
        moe.USE_GROUPED_MM = grouped

        def step() -> None:
            layer(x).sum().backward()
            torch.cuda.synchronize()

        seconds = best_of(step, repeats=args.repeats, warmup=2)
        out[name] = {"ms": round(1e3 * seconds, 2), "tflops": round(flops / seconds / 1e12, 1),
                     "mfu_active": round(flops / seconds / 989e12, 3)}  # fmt: skip
    moe.USE_GROUPED_MM = True
    out["grouped_over_loop_speedup"] = round(out["loop"]["ms"] / out["grouped_mm"]["ms"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny shape")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        report("moe", {"gpu_layer": _gpu(args)})
        return
    if args.smoke:
        args.layers, args.hidden, args.ffn, args.seq, args.batch, args.repeats = 1, 64, 128, 32, 2, 1
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_exchange_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
        exchange = dict(out)
    tokens = args.batch * args.seq
    formula = args.topk * args.hidden * 4 * 2 * (2 - 1) / 2  # top-k x h x fp32 x 2 directions x (EP-1)/EP
    fwd_rows = exchange["forward"]["rows"] / tokens
    results: dict[str, Any] = {
        "shape": {k: v for k, v in vars(args).items() if k != "smoke"},
        "all_to_all_ep2": {
            "forward_bytes_per_token": fwd_rows,
            "forward_and_backward_bytes_per_token": exchange["total"]["rows"] / tokens,
            "formula_bytes_per_token": formula,
            "forward_over_formula": round(fwd_rows / formula, 4),
            "count_exchange_bytes_forward": exchange["forward"]["counts"],
        },
    }
    dense_cfg, moe_cfg = _cfg(args, moe=False), _cfg(args, moe=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    dense, moe = _step_seconds(dense_cfg, args), _step_seconds(moe_cfg, args)
    results["step_ep1"] = {
        "dense_params": total_params(dense_cfg, 8192), "moe_params": total_params(moe_cfg, 8192),
        "moe_active_params": active_params(moe_cfg, 8192), "dense_step_s": round(dense, 4),
        "moe_step_s": round(moe, 4), "moe_over_dense": round(moe / dense, 3),
        "dense_tokens_per_s": round(tokens / dense), "moe_tokens_per_s": round(tokens / moe),
        "measured_in_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    report("moe", results)


if __name__ == "__main__":
    main()
