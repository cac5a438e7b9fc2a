"""Data start-up at scale: the blend index from 1 M to 100 M samples, and the time to the first
training step on a large blended corpus, cold (no index cache) and warm.

  python benchmarks/data_startup.py                      # 10 B tokens in 3 datasets, seq 2048
  python benchmarks/data_startup.py --tokens 1e9 --skip-pretrain
  python benchmarks/data_startup.py --smoke              # seconds (the test suite runs this)

The corpus is synthetic: each dataset's .idx holds real random document lengths (100-3000
tokens), written in Megatron's format; its .bin is a sparse file of the right size (reads return
token 0), so 10 B tokens take ~150 MB of disk. Three measurements:

1. `build_blend_index` (the compiled helper; the Python loop at 1 M for comparison), and the
   cached form (`cached_blend_index`: build + write, then a warm mapped load), 3 datasets.
2. In one process: `build_datasets` for the whole run (the train/valid/test GPT indices of the
   three datasets and the blend over them), then the read of the first global batch (512
   samples), cold and warm. The cold read of a sparse file is not a disk read: the kernel zeroes
   each read-ahead window on first touch, a cost real files pay as disk reads instead.
3. `scripts/pretrain.py` (a tiny model, one process) from its start to the start of iteration 1
   (the time of its log line minus the step time it reports), cold and warm: everything a user
   waits for before training computes, Python imports and DeepSpeed set-up included.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, report

from llm.config import DataConfig
from llm.data.blended import blend_index_python, build_blend_index, cached_blend_index, normalize_weights
from llm.data.indexed_dataset import write_index
from llm.data.loader import GlobalBatchSampler, SplitSizes, build_datasets, make_loader

WEIGHTS = [0.5, 0.3, 0.2]


def make_corpus(directory: Path, total_tokens: int, n: int) -> list[str]:
    """n datasets of total_tokens / n tokens each; returns their prefixes."""
    rng = np.random.default_rng(0)
    prefixes = []
    for j in range(n):
        prefix = directory / f"part{j}"
        per = total_tokens // n
        lengths = rng.integers(100, 3001, size=per // 1550 + 1000, dtype=np.int64)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), per)) + 1]
        write_index(f"{prefix}.idx", np.uint16, lengths)
        with open(f"{prefix}.bin", "wb") as f:
            f.truncate(int(lengths.sum()) * 2)  # sparse
        prefixes.append(str(prefix))
    return prefixes


def time_blend(sizes: list[int], cache: Path) -> dict:
    out: dict = {}
    start = time.perf_counter()
    n = min(1_000_000, sizes[0])
    blend_index_python(normalize_weights(WEIGHTS), n)
    out["python_loop_us_per_sample"] = round((time.perf_counter() - start) / n * 1e6, 2)
    for n in sizes:
        start = time.perf_counter()
        build_blend_index(WEIGHTS, n)
        built = time.perf_counter() - start
        start = time.perf_counter()
        cached_blend_index(np.asarray(WEIGHTS), n, cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        di, _ = cached_blend_index(np.asarray(WEIGHTS), n, cache)
        int(di[-1])
        warm = time.perf_counter() - start
        out[f"blend_{n}"] = {"build_s": round(built, 3), "cold_cached_s": round(cold, 3), "warm_s": round(warm, 4)}
        print(n, out[f"blend_{n}"], file=sys.stderr, flush=True)
    return out


def data_startup(prefixes: list[str], *, seq: int, train: int, valid: int, gbs: int) -> tuple[float, float]:
    """(seconds of build_datasets, seconds to read the first global batch of `gbs` samples)."""
    start = time.perf_counter()
    blend = " ".join(f"{w} {p}" for w, p in zip(WEIGHTS, prefixes))
    cfg = DataConfig(train_data_path=blend, split="969,30,1")
    ds, _, _ = build_datasets(cfg, seq_length=seq, sizes=SplitSizes(train, valid, valid // 10), seed=1234)
    built = time.perf_counter() - start
    sampler = GlobalBatchSampler(total_samples=len(ds), consumed_samples=0, micro_batch_size=gbs,
                                 global_batch_size=gbs, dp_rank=0, dp_size=1)  # fmt: skip
    next(iter(make_loader(ds, sampler)))
    return built, time.perf_counter() - start - built


def pretrain_first_step(prefixes: list[str], run_dir: Path, *, seq: int, iters: int) -> tuple[float, float]:
    """(seconds from the process start to the end of step 1, seconds step 1 itself took)."""
    blend = " ".join(f"{w} {p}" for w, p in zip(WEIGHTS, prefixes))
    cmd = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           f"data.train_data_path={blend}", f"model.seq_length={seq}", "train.micro_batch_size=4",
           "train.global_batch_size=4", f"train.train_iters={iters}", "eval.eval_interval=1000", "eval.eval_iters=1",
           "logging.log_interval=1", f"logging.dir={run_dir}", "logging.wandb_mode=disabled",
           "checkpoint.save_interval=null", "eval.lm_eval_tasks=[]"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "iter " in line and f"1/{iters}" in line:
            elapsed = time.perf_counter() - start
            proc.kill()
            proc.wait()
            step = float(re.search(r"\| ([0-9.]+) s/it", line).group(1))  # type: ignore[union-attr]
            return elapsed, step
    proc.wait()
    raise SystemExit("pretrain.py ended before its first step:\n" + "".join(lines[-30:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=10e9)
    parser.add_argument("--datasets", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--blend-sizes", default="1,10,100", help="millions of samples")
    parser.add_argument("--dir", default=None, help="where the synthetic corpus goes (default: a temp dir)")
    parser.add_argument("--skip-pretrain", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="seconds: 20 M tokens, small blends, one pretrain start")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.seq_length, args.blend_sizes = 2e7, 256, "0.01,0.1"
    directory = Path(args.dir or tempfile.mkdtemp(prefix="llm-data-startup-"))
    directory.mkdir(parents=True, exist_ok=True)
    results: dict = {"tokens": int(args.tokens), "datasets": args.datasets, "seq_length": args.seq_length}
    try:
        results.update(time_blend([int(float(x) * 1_000_000) for x in args.blend_sizes.split(",")], directory / "blend"))
        shutil.rmtree(directory / "blend")
        start = time.perf_counter()
        prefixes = make_corpus(directory, int(args.tokens), args.datasets)
        results["corpus_written_s"] = round(time.perf_counter() - start, 1)
        results["documents"] = sum(os.path.getsize(f"{p}.idx") // 20 for p in prefixes)
        train = int(args.tokens) // args.seq_length  # one pass over the corpus
        gbs = 512
        for label in ("cold", "warm"):
            if label == "cold":
                shutil.rmtree(directory / "index-cache", ignore_errors=True)
            built, read = data_startup(prefixes, seq=args.seq_length, train=train, valid=train // 100, gbs=gbs)
            results[f"build_datasets_{label}_s"] = round(built, 4)
            results[f"first_batch_of_{gbs}_{label}_s"] = round(read, 4)
            print(label, built, read, file=sys.stderr, flush=True)
        if not args.skip_pretrain:
            iters = train // 4
            for label in ("cold",) if args.smoke else ("cold", "warm"):
                if label == "cold":
                    shutil.rmtree(directory / "index-cache", ignore_errors=True)
                t, step = pretrain_first_step(prefixes, directory / f"run-{label}", seq=args.seq_length, iters=iters)
                results[f"pretrain_to_first_step_{label}_s"] = round(t - step, 1)  # when step 1 starts
                results[f"pretrain_first_step_compute_{label}_s"] = round(step, 1)
                print("pretrain", label, t, step, file=sys.stderr, flush=True)
        results["train_samples"] = train
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    report("data_startup", results)


if __name__ == "__main__":
    main()
