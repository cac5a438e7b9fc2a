"""Tensor-parallel communication and step time on CPU (gloo).

  python benchmarks/tp_comm.py [--layers 4 --hidden 256 --seq 256 --batch 4]

For TP = 1 and 2 (and 2 with sequence parallelism): bytes handed to TP collectives in one
forward+backward of the GPT (counted in llm.parallel.mappings), against Megatron's analytic figure
without sequence parallelism: 4 all-reduces of B x S x H per layer (2 in forward after the
row-parallel layers, 2 in backward before the column-parallel ones), plus the embedding's forward
all-reduce and the LM head's backward all-reduce (2 B x S x H) and the vocab-parallel loss's three
(B x S) all-reduces. Also the best forward+backward time of 5.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import report

from llm.config import ModelConfig
from llm.model.gpt import build_model
from llm.parallel import mappings
from llm.parallel.context import ParallelContext, _free_port


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, sp: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = ParallelContext.build(tp=world)
    cfg = ModelConfig(architecture="gpt2", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                      seq_length=args.seq, vocab_size=8192, sequence_parallel=sp)  # fmt: skip
    model = build_model(cfg, seed=0, ctx=ctx)
    tokens = torch.randint(0, 8192, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:]).backward()

    step()
    for k in mappings.COMM_BYTES:
        mappings.COMM_BYTES[k] = 0
    step()
    counted = dict(mappings.COMM_BYTES)
    times = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.update(counted=counted, step_seconds=min(times))
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace, sp: bool) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), args, sp, out), nprocs=world, join=True)
        return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    bsh = args.batch * args.seq * args.hidden * 4  # fp32 bytes of one (B, S, H) activation
    analytic_layers = 4 * args.layers * bsh
    analytic_total = analytic_layers + 2 * bsh + 3 * args.batch * args.seq * 4
    results = {"shape": vars(args), "analytic_megatron_bytes_layers": analytic_layers,
               "analytic_bytes_with_embedding_and_loss": analytic_total}  # fmt: skip
    for name, world, sp in [("tp1", 1, False), ("tp2", 2, False), ("tp2_sequence_parallel", 2, True)]:
        if world == 1:
            ctx_free = measure(1, args, False)
            results[name] = {"step_seconds": round(ctx_free["step_seconds"], 4)}
            continue
        r = measure(world, args, sp)
        results[name] = {"bytes": r["counted"], "total_bytes": sum(r["counted"].values()),
                         "step_seconds": round(r["step_seconds"], 4)}  # fmt: skip
    results["tp2_counted_over_analytic"] = round(results["tp2"]["total_bytes"] / analytic_total, 4)
    report("tp_comm", results)


if __name__ == "__main__":
    main()
