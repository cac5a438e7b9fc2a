"""Synchronous data parallelism against DiLoCo islands: validation loss and bytes on the wire per token.

  python benchmarks/diloco.py [--iters 600] [--data PREFIX] [--only NAME ...] [--smoke]

Every run is pretrain.py on 2 processes (torchrun, gloo) on the built-in corpus with the same
model, global batch, learning-rate schedule and number of tokens: ordinary DP over the 2 ranks, or
2 islands of 1 rank each. Each worker counts what it hands to torch.distributed's collectives (the
benchmark wraps them before training starts) and converts it to the bytes a ring algorithm sends
per rank: all-reduce 2 (n - 1) / n x size, all-gather (n - 1) x size, reduce-scatter
(n - 1) / n x size, broadcast (n - 1) / n x size. With 2 ranks every byte crosses the link
between them, which stands for the slow link between two groups of nodes. The validation loss is
the run's last evaluation (eval.eval_iters batches of the validation split, after DiLoCo's final
synchronization).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import REPO, report

PREFIX = REPO / "data" / "builtin" / "builtin_text_document"
SHAPE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2", "model.seq_length=64",
         "train.micro_batch_size=8", "train.global_batch_size=16", "train.lr=3e-3", "train.min_lr=3e-4",
         "eval.eval_iters=20"]  # fmt: skip
ISLANDS = ["parallel.diloco.islands=2"]
RUNS: dict[str, list[str]] = {
    "sync_dp": [],
    "diloco_h8": [*ISLANDS, "parallel.diloco.inner_steps=8"],
    "diloco_h32": [*ISLANDS, "parallel.diloco.inner_steps=32"],
    "streaming_h8_f2_delay2": [*ISLANDS, "parallel.diloco.inner_steps=8", "parallel.diloco.fragments=2",
                               "parallel.diloco.delay=2"],
    "diloco_h8_int8": [*ISLANDS, "parallel.diloco.inner_steps=8", "parallel.diloco.exchange=int8"],
    "diloco_h8_int4": [*ISLANDS, "parallel.diloco.inner_steps=8", "parallel.diloco.exchange=int4"],
    "streaming_h8_f2_delay2_int4": [*ISLANDS, "parallel.diloco.inner_steps=8", "parallel.diloco.fragments=2",
                                    "parallel.diloco.delay=2", "parallel.diloco.exchange=int4"],
}  # fmt: skip


# ------------------------------------------------------------------ inside each training process
def _count_collectives(counts: dict[str, float]) -> None:
    """Wraps torch.distributed's collectives (module and c10d namespaces, before DeepSpeed caches
    them) so that every call adds its ring-algorithm bytes per rank to counts[name]."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    def size(t: Any) -> int:
        return int(t.numel() * t.element_size())

    rules = {  # name -> (index of the tensor argument, factor(n))
        "all_reduce": (0, lambda n: 2 * (n - 1) / n),
        "all_gather": (1, lambda n: n - 1),
        "all_gather_into_tensor": (1, lambda n: n - 1),
        "_all_gather_base": (1, lambda n: n - 1),
        "reduce_scatter_tensor": (1, lambda n: (n - 1) / n),
        "_reduce_scatter_base": (1, lambda n: (n - 1) / n),
        "broadcast": (0, lambda n: (n - 1) / n),
    }

    def wrap(name: str, fn: Any, index: int, factor: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensor = args[index] if len(args) > index else kwargs.get("tensor", kwargs.get("input_tensor"))
            at = 3 if "reduce_scatter" in name else 2  # where the group is when passed positionally
            n = dist.get_world_size(kwargs.get("group") or (args[at] if len(args) > at else None))
            if tensor is not None and n > 1:
                counts[name] += size(tensor) * factor(n)
            return fn(*args, **kwargs)

        return counted

    for name, (index, factor) in rules.items():
        original = getattr(c10d, name)
        wrapped = wrap(name, original, index, factor)
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)


def worker(out: str, overrides: list[str]) -> None:
    counts: dict[str, float] = defaultdict(float)
    _count_collectives(counts)
    from llm.config import load_config
    from llm.training.pretrain import run_pretraining

    run_pretraining(load_config(REPO / "configs" / "tiny_cpu.yaml", overrides))
    Path(f"{out}.rank{os.environ['RANK']}").write_text(json.dumps(counts))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as scripts/pretrain.py: no interpreter finalization after the process groups are gone


# ---------------------------------------------------------------------------------- the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(name: str, extra: list[str], iters: int, data: Path, work: Path) -> dict[str, Any]:
    run_dir, out = work / name, work / f"{name}.bytes"
    overrides = [*SHAPE, *extra, f"train.train_iters={iters}", f"train.lr_warmup_iters={min(30, iters // 4)}", f"eval.eval_interval={iters}",
                 f"data.train_data_path={data}", f"logging.dir={run_dir}", "logging.wandb_mode=disabled",
                 "checkpoint.save_interval=null", "logging.log_interval=50"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           __file__, "--worker", str(out), *overrides]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    sent = sum(sum(c.values()) for c in counts) / 2  # per rank
    tokens = iters * 16 * 64
    steps = [r for r in records if "loss" in r]
    outer = [r for r in records if "diloco_bytes_sent" in r]
    return {
        "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1],
        "train_loss_last50": sum(r["loss"] for r in steps[-50:]) / len(steps[-50:]),
        "bytes_per_rank": sent,
        "bytes_per_token": sent / tokens,
        "diloco_bytes_reported_per_rank": sum(r["diloco_bytes_sent"] for r in outer) if outer else None,
        "diloco_wait_seconds": sum(r["diloco_wait_seconds"] for r in outer) if outer else None,
        "outer_steps": len(outer),
        "bytes_by_collective": {k: sum(c.get(k, 0) for c in counts) / 2 for k in sorted({*counts[0], *counts[1]})},
        "seconds_per_step": sum(r["step_time"] for r in steps) / len(steps),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], [a for a in sys.argv[3:] if not a.startswith("--local")])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--data", type=Path, default=PREFIX)
    parser.add_argument("--only", nargs="*", default=None, help=f"some of {list(RUNS)}")
    parser.add_argument("--islands-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides for the island runs, e.g. parallel.diloco.outer_lr=1.0")
    parser.add_argument("--smoke", action="store_true", help="8 iterations of sync_dp and diloco_h8_int4")
    args = parser.parse_args()
    names = ["sync_dp", "diloco_h8_int4"] if args.smoke else (args.only or list(RUNS))
    iters = 8 if args.smoke else args.iters
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            extra = RUNS[name] + (args.islands_set if RUNS[name] else [])
            results[name] = one_run(name, extra, iters, args.data, Path(tmp))
    base = results.get("sync_dp")
    if base is not None:
        for r in results.values():
            r["bytes_reduction_vs_sync"] = base["bytes_per_token"] / r["bytes_per_token"]
            r["val_loss_vs_sync"] = r["val_loss"] / base["val_loss"] - 1
    report("diloco", {"iters": iters, "tokens": iters * 16 * 64, "islands_set": args.islands_set, "runs": results})


if __name__ == "__main__":
    main()
