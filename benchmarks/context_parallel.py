"""Context parallelism on CPU: activation memory per rank, communication per layer and step time at a
long sequence, for C = 1, 2 and 4, ring attention (p2p) and Ulysses (a2a).

  python benchmarks/context_parallel.py [--seq 8192 --hidden 64 --layers 2] [--smoke]

One forward + backward of a llama-preset GPT (4 heads, 4 KV groups) over one sample of --seq tokens;
C gloo processes each hold S / C tokens (the load-balanced chunks). Per rank:
- activation bytes: every distinct storage autograd saves during the forward (parameters excluded),
  counted with saved-tensor hooks: what backward keeps alive, measured, not estimated;
- bytes sent per layer, counted by wrapping torch.distributed's send paths (`batch_isend_irecv`'s sends
  and `all_to_all_single`'s chunks to other ranks), forward and backward, against the formulas:
  p2p 2 (C - 1) x K/V block bytes forward, and backward the blocks again plus their gradients;
  a2a: 4 all-to-alls forward (q, k, v, out) and 4 backward of (C - 1) / C of each rank's tensor;
- the best step time of 3 (2 cores: the ranks share them, so step times are stated, not compared).
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
from llm.parallel.cp_attention import cp_shard
from llm.parallel.process_groups import ParallelContext

SENT = {"bytes": 0}


def _count_sends() -> None:
    original_batch, original_a2a = dist.batch_isend_irecv, dist.all_to_all_single

    def batch(ops: list[Any]) -> Any:
        SENT["bytes"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return original_batch(ops)

    def a2a(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        size = dist.get_world_size(group)
        SENT["bytes"] += input.numel() * input.element_size() * (size - 1) // size  # equal splits
        return original_a2a(output, input, *args, **kwargs)

    dist.batch_isend_irecv = batch  # type: ignore[assignment]
    dist.all_to_all_single = a2a  # type: ignore[assignment]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, comm: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = ParallelContext.build(cp=world, cp_comm_type=comm)
    cfg = ModelConfig(architecture="llama", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                      seq_length=args.seq, vocab_size=512)  # fmt: skip
    model = build_model(cfg, seed=0, ctx=ctx)
    tokens = torch.randint(0, 512, (1, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = cp_shard(tokens[:, :-1], world, ctx.cp_rank), cp_shard(tokens[:, 1:], world, ctx.cp_rank)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    _count_sends()  # from here on: a second forward, and its backward
    loss = model(x, y)
    forward_sent = SENT["bytes"]
    loss.backward()
    backward_sent = SENT["bytes"] - forward_sent
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        model(x, y).backward()
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.update(activation_bytes=sum(saved.values()), forward_sent_per_layer=forward_sent // args.layers,
                   backward_sent_per_layer=backward_sent // args.layers, step_seconds=min(times))  # fmt: skip
    ctx.shutdown()  # meet, then tear down: a rank leaving while another still uses gloo can abort it
    os._exit(0)  # as scripts/pretrain.py: interpreter finalization now and then aborts in gloo's threads


def measure(world: int, args: argparse.Namespace, comm: str) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), args, comm, out), nprocs=world, join=True)
        return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="seconds: a short sequence")
    args = parser.parse_args()
    if args.smoke:
        args.seq, args.layers = 256, 1
    kv_block = args.seq * args.hidden * 4  # K and V of the whole sequence, fp32 (4 KV groups x d = hidden)
    results: dict[str, Any] = {"shape": {k: v for k, v in vars(args).items() if k != "smoke"}}
    base = None
    for comm, worlds in (("p2p", (1, 2, 4)), ("a2a", (2, 4))):
        for world in worlds if not args.smoke else (1, 2):
            r = measure(world, args, comm)
            name = f"c{world}" if world == 1 else f"c{world}_{comm}"
            if world == 1:
                if comm != "p2p":
                    continue
                base = r["activation_bytes"]
            c = world
            local = 2 * kv_block // c  # this rank's K and V
            formula_fwd = (c - 1) * local if comm == "p2p" else 4 * (args.seq // c) * args.hidden * 4 * (c - 1) // c
            r["activation_over_c1"] = round(r["activation_bytes"] / base, 3) if base else None
            r["forward_formula_per_layer"] = formula_fwd if c > 1 else 0
            r["step_seconds"] = round(r["step_seconds"], 3)
            results[name] = r
    report("context_parallel", results)


if __name__ == "__main__":
    main()
