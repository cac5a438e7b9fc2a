"""The planner's memory estimate against the measured peak memory of real training runs.

python benchmarks/plan_memory.py --data data/builtin/builtin_text_document [--only z0_dp1,pp2] [--out DIR] [--smoke]

Each case runs benchmarks/pretrain_measured.py (scripts/pretrain.py whose peak leaves out the
interpreter's own memory on CPU) through the deepspeed launcher (fp32 on CPU, 2 iterations of a
4-layer, 512-wide GPT with 16.5M parameters, micro-batches of 4 x 256 tokens, two per rank and
step: global batch 8 at DP 1, 16 at DP 2; more leave the peak where it is: a second micro-batch's
backward with the first one's gradients held, the pipeline's two micro-batches in flight)
and reads `peak_memory_gb` (the largest of any rank) from its metrics (the peak is the second
iteration's: the optimizer state exists from the end of the first); the estimate is llm.planner's for the same config and layout. Runs set
MALLOC_MMAP_THRESHOLD_=65536 so CPU resident memory follows live tensor memory: glibc returns a
freed block to the system only when it was mmap-backed, and its adaptive threshold otherwise keeps
many freed multi-MB tensors in the heap (RSS 20-30% above live tensor memory in training). On a GPU the same script compares against torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from common import REPO, machine

from llm.config import load_config
from llm.planner.memory import GB
from llm.planner.report import config_layout, estimate_for_run

BASE = ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8", "model.seq_length=256",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.train_iters=2", "train.lr_warmup_iters=1",
        "logging.log_interval=1", "eval.eval_iters=1", "eval.eval_interval=1000", "logging.wandb_mode=disabled",
        "checkpoint.save_interval=null", "checkpoint.resume=none"]  # fmt: skip
SMOKE = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=2", "model.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=2", "train.train_iters=2"]  # fmt: skip
Z = "deepspeed_config=configs/deepspeed/zero{}.json".format
DP2 = "train.global_batch_size=16"  # two micro-batches per rank and step, as at DP 1
CASES: dict[str, tuple[int, list[str]]] = {
    "z0_dp1": (1, []),
    "z0_dp2": (2, [Z(0), DP2]),
    "z1_dp2": (2, [Z(1), DP2]),
    "z2_dp2": (2, [Z(2), DP2]),
    "z3_dp2": (2, [Z(3), DP2]),
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "tp2_sp_z1": (2, ["parallel.tensor_model_parallel_size=2", "model.sequence_parallel=true", Z(1)]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "llama_gqa": (1, ["model.architecture=llama", "model.num_query_groups=2"]),
    "act_ckpt": (1, ["model.activation_checkpointing=true"]),
}


def run_case(name: str, nproc: int, extra: list[str], data: str, out: Path) -> Path:
    run_dir = out / name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), "benchmarks/pretrain_measured.py",
           "--config", "configs/tiny_cpu.yaml", *BASE, f"data.train_data_path={data}", f"logging.dir={run_dir}",
           *extra]  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{name} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return run_dir


def compare(run_dir: Path, precision: str) -> tuple[str, float, float]:
    cfg = load_config(run_dir / "config.yaml")
    layout = config_layout(cfg, json.loads((run_dir / "layout.json").read_text())["world_size"])
    estimate = estimate_for_run(run_dir, precision=precision)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [r["peak_memory_gb"] for r in records if r.get("peak_memory_gb") is not None][-1]
    return layout.describe(), measured, estimate.total / GB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a preprocessed token prefix (e.g. the built-in corpus)")
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--out", default="runs/bench_plan_memory")
    p.add_argument("--smoke", action="store_true", help="seconds: one tiny single-process case")
    args = p.parse_args()
    names = [n for n in CASES if not args.only or n in args.only.split(",")]
    if args.smoke:
        names = ["z0_dp1"]
        BASE.extend(SMOKE)
    import torch

    precision = "bf16" if torch.cuda.is_available() else "fp32"
    print(f"# {machine()}; precision {precision}")
    print(f"{'case':<11} {'layout':<26} {'measured GB':>11} {'estimate GB':>11} {'est/meas':>8}")
    worst = 0.0
    for name in names:
        nproc, extra = CASES[name]
        layout, measured, estimate = compare(run_case(name, nproc, extra, args.data, Path(args.out)), precision)
        worst = max(worst, abs(estimate / measured - 1))
        print(f"{name:<11} {layout:<26} {measured:>11.3f} {estimate:>11.3f} {estimate / measured:>8.3f}")
    print(f"largest relative difference: {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
