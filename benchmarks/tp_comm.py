"""Tensor-parallel communication and step time on CPU (gloo).

  python benchmarks/tp_comm.py [--layers 4 --hidden 256 --seq 256 --batch 4] [--smoke]

For TP = 1 and 2 (and 2 with sequence parallelism): bytes handed to TP collectives in one
forward+backward of the GPT (counted here by wrapping torch.distributed's collectives), against Megatron's analytic figure
without sequence parallelism: 4 all-reduces of B x S x H per layer (2 in forward after the
row-parallel layers, 2 in backward before the column-parallel ones), plus the embedding's forward
all-reduce and the LM head's backward all-reduce (2 B x S x H) and the vocab-parallel loss's three
(B x S) all-reduces. Also the best forward+backward time of 5. The parallel block (model.parallel_block)
runs halve the layers' share: one reduction per layer in forward and one in backward.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import report

from llm.config import ModelConfig
from llm.model.gpt import build_model
from llm.parallel.process_groups import ParallelContext

COUNTED = {"all_reduce": 0, "all_gather": 0, "reduce_scatter_tensor": 0}


def _count_collectives() -> None:
    """Wraps torch.distributed's collectives so this process counts the bytes of their inputs."""

    def wrap(kind: str, position: int) -> None:
        original = getattr(dist, kind)

        def counted(*args: Any, **kwargs: Any) -> Any:
            t = args[position]
            COUNTED[kind] += t.numel() * t.element_size()
            return original(*args, **kwargs)

        setattr(dist, kind, counted)

    wrap("all_reduce", 0)  # all_reduce(tensor)
    wrap("all_gather", 1)  # all_gather(outputs, tensor)
    wrap("reduce_scatter_tensor", 1)  # reduce_scatter_tensor(output, input)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, sp: bool, parallel: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _count_collectives()
    ctx = ParallelContext.build(tp=world)
    cfg = ModelConfig(architecture="gpt2", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                      seq_length=args.seq, vocab_size=8192, sequence_parallel=sp, parallel_block=parallel)  # fmt: skip
    model = build_model(cfg, seed=0, ctx=ctx)
    tokens = torch.randint(0, 8192, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).backward()

    step()
    COUNTED.update(dict.fromkeys(COUNTED, 0))
    step()
    counted = {"all_reduce": COUNTED["all_reduce"], "all_gather": COUNTED["all_gather"],
               "reduce_scatter": COUNTED["reduce_scatter_tensor"]}  # fmt: skip
    times = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.update(counted=counted, step_seconds=min(times))
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace, sp: bool, parallel: bool = False) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), args, sp, parallel, out), nprocs=world, join=True)
        return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny shape")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.seq, args.batch = 1, 64, 32, 2
    bsh = args.batch * args.seq * args.hidden * 4  # fp32 bytes of one (B, S, H) activation
    analytic_layers = 4 * args.layers * bsh
    analytic_total = analytic_layers + 2 * bsh + 3 * args.batch * args.seq * 4
    results = {"shape": {k: v for k, v in vars(args).items() if k != "smoke"}, "analytic_megatron_bytes_layers": analytic_layers,
               "analytic_bytes_with_embedding_and_loss": analytic_total}  # fmt: skip
    runs = [("tp1", 1, False, False), ("tp2", 2, False, False), ("tp2_sequence_parallel", 2, True, False),
            ("tp2_parallel_block", 2, False, True), ("tp2_sequence_parallel_parallel_block", 2, True, True)]
    if args.smoke:  # every code path, fewest processes
        runs = [runs[1], runs[4]]
    for name, world, sp, parallel in runs:
        if world == 1:
            ctx_free = measure(1, args, False)
            results[name] = {"step_seconds": round(ctx_free["step_seconds"], 4)}
            continue
        r = measure(world, args, sp, parallel)
        results[name] = {"bytes": r["counted"], "total_bytes": sum(r["counted"].values()),
                         "step_seconds": round(r["step_seconds"], 4)}  # fmt: skip
    results["tp2_counted_over_analytic"] = round(results["tp2"]["total_bytes"] / analytic_total, 4)
    # per transformer layer: what the layers add over the embedding and loss (the same in every run)
    outside = analytic_total - analytic_layers
    for name in ("tp2", "tp2_parallel_block", "tp2_sequence_parallel", "tp2_sequence_parallel_parallel_block"):
        if name in results:
            results[name]["bytes_per_layer"] = (results[name]["total_bytes"] - outside) // args.layers
    report("tp_comm", results)


if __name__ == "__main__":
    main()
