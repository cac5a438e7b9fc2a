"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# The shape the CPU training benchmarks measure (configs/tiny_cpu.yaml until 2026-11-26, when the
# quickstart moved to a smaller, faster model): 5.3M parameters, so documented numbers stay comparable.
BENCH_SHAPE = ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.seq_length=256",
               "train.micro_batch_size=8", "train.global_batch_size=16", "train.lr=1e-3"]  # fmt: skip


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def best_of(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of `fn` over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name: str, results: dict[str, Any]) -> None:
    print(
        json.dumps(
            {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **results}, indent=1
        )
    )
