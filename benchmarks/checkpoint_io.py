"""Checkpoint checksums: hashing speed, and what they add to a save.

  python benchmarks/checkpoint_io.py [--gb 1] [--iters 8] [--data PREFIX] [--smoke]

1. xxh3-64 (what MANIFEST.json records) over a --gb file of random bytes, read from the page cache
   (the second of two passes), next to zlib's CRC32 and SHA-256 for scale; and the first (cold-ish)
   pass, which includes reading the file. torch.save of --gb of tensors into memory with and without
   its zip format's CRC-32 of each record (llm's saves leave it out: writer.without_zip_crc32). A
   durable save of --gb of tensors to disk: torch.save, read back to hash, fsync, against llm's
   checkpoint writer (hashed while written, flushed behind: llm/checkpoint/writer.py).
2. scripts/pretrain.py on configs/tiny_cpu.yaml saving a checkpoint every iteration: the median
   save time (`checkpoint_save_seconds` in metrics.jsonl, the whole save: DeepSpeed's files, ours,
   checksums, MANIFEST, `latest`), the time the checksums of one such checkpoint take read back from
   the page cache (what verifying it costs; a save hashes its torch files while writing them), and
   that against the save, and the save against a training step.
3. Asynchronous saves (checkpoint.async_save) on a model whose synchronous save takes seconds
   (GPT-2 125M shape, fp32 weights and AdamW state: about 1.4 GB per save): the same run of 96 steps
   saving every 32 (`--async-iters`, `--async-save-interval`: on this 2-core machine a background
   write takes 6-11 s beside training, so saves must be further apart than 16 steps, 9 s, or each
   waits for the write before it), synchronously and asynchronously.
   `--async-only --async-config configs/gpt2_125m.yaml --async-override ...` runs only this part, on
   another config (benchmarks/gpu_check.sh on a GPU). Reported: the synchronous save, the blocking
   part of an asynchronous one (`checkpoint_block_seconds`: the wait for the write before it, the
   save call and the next optimizer step's wait for the host copy) and its background part
   (`checkpoint_write_seconds`: the copy too), and the median step of the steps that ran while a
   background write was in flight (the first of them made the copy) against the synchronous run's
   median step, against the asynchronous run's steps without a write (the first 2 steps of each run
   left out) and, step by step, against the same iterations of the synchronous run
   (`..._same_iterations`: the median of the ratios); the same for the writes after the first save
   (which allocates the host buffers and starts the writer process), and the training time such a
   write adds in all (`extra_step_seconds_per_later_write`: the overlapped steps' time beyond the
   same steps of the synchronous run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from common import BENCH_SHAPE, REPO, report

from llm.checkpoint import writer
from llm.checkpoint.format import checkpoint_files, describe_files, file_checksum

PREFIX = REPO / "data" / "builtin" / "builtin_text_document"
SMOKE = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=2", "model.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=4"]  # fmt: skip


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def hashing(gb: float, directory: Path) -> dict[str, float]:
    path = directory / "blob"
    size = int(gb * 2**30)
    with path.open("wb") as f:
        for _ in range(0, size, 64 << 20):
            f.write(os.urandom(min(64 << 20, size - f.tell())))
    first = _timed(lambda: file_checksum(path))
    data = path.read_bytes()
    out = {
        "file_gb": round(size / 2**30, 3),
        "xxh3_first_pass_gb_per_s": round(size / 2**30 / first, 2),
        "xxh3_page_cache_gb_per_s": round(size / 2**30 / _timed(lambda: file_checksum(path)), 2),
        "crc32_in_memory_gb_per_s": round(size / 2**30 / _timed(lambda: zlib.crc32(data)), 2),
        "sha256_in_memory_gb_per_s": round(size / 2**30 / _timed(lambda: hashlib.sha256(data).digest()), 2),
    }
    out["xxh3_seconds_per_gb"] = round(1 / out["xxh3_page_cache_gb_per_s"], 3)
    path.unlink()
    return {**out, **zip_crc(gb), **durable_writes(gb, directory)}


def durable_writes(gb: float, directory: Path, rounds: int = 3) -> dict[str, float]:
    """A --gb state dict (24 fp32 tensors) saved to disk, hashed and flushed (a durable save of one
    file): torch.save to the path, then the file read back to hash it and fsynced (llm's saves until
    the thirteenth session), against llm.checkpoint.writer (hashed while written, flushed behind the
    writer through the same 64 MB of page cache), in turn `rounds` times each, every save to a new
    file kept to the end (as checkpoints are: a file's page cache is not freed for the next): medians,
    seconds."""
    state = {f"w{i}": torch.randn(int(gb * 2**30) // 4 // 24) for i in range(24)}
    timings: dict[str, list[float]] = {"path_then_hash": [], "writer": []}

    def path_then_hash(path: Path) -> None:
        with writer.without_zip_crc32():
            torch.save(state, path)
        file_checksum(path, durable=True)

    for i in range(rounds):
        timings["path_then_hash"].append(_timed(lambda i=i: path_then_hash(directory / f"path_{i}.pt")))
        timings["writer"].append(_timed(lambda i=i: writer.write(state, directory / f"writer_{i}.pt", durable=True)))
    for f in directory.glob("*_[0-9]*.pt"):
        f.unlink()
    return {f"durable_save_seconds_{k}": round(statistics.median(v), 3) for k, v in timings.items()}


def zip_crc(gb: float, rounds: int = 3) -> dict[str, float]:
    """torch.save of a --gb state dict (60 fp32 tensors) into memory, with torch's zip CRC-32 of each
    record (torch's default) and without (what llm's saves write, writer.without_zip_crc32), in
    turn `rounds` times each (this machine's first touch of fresh memory costs more than the copy, so
    neither side gets all of it): medians."""
    state = {f"w{i}": torch.randn(int(gb * 2**30) // 4 // 60) for i in range(60)}
    timings: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for crc in (True, False):
            with contextlib.nullcontext() if crc else writer.without_zip_crc32():
                timings[crc].append(_timed(lambda: torch.save(state, io.BytesIO())))
    with_crc, without = statistics.median(timings[True]), statistics.median(timings[False])
    return {"torch_save_gb_per_s_with_zip_crc32": round(gb / with_crc, 2),
            "torch_save_gb_per_s_without_zip_crc32": round(gb / without, 2)}  # fmt: skip


BIG = ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12", "model.seq_length=128",
       "train.micro_batch_size=1", "train.global_batch_size=1"]  # fmt: skip


def _pretrain(run_dir: Path, prefix: Path, iters: int, extra: list[str], *, save_interval: int = 4,
              config: str = "configs/tiny_cpu.yaml") -> list[dict]:  # fmt: skip
    """scripts/pretrain.py on `config` (with `extra`), every step logged; its metrics."""
    cmd = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--config", config, *extra,
           f"train.train_iters={iters}", "train.lr_warmup_iters=1", "logging.log_interval=1",
           f"eval.eval_interval={10 * iters}", "eval.eval_iters=1", f"checkpoint.save_interval={save_interval}",
           "logging.wandb_mode=disabled", f"logging.dir={run_dir}", f"data.train_data_path={prefix}"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def save_overhead(iters: int, run_dir: Path, prefix: Path, extra: list[str]) -> dict[str, float]:
    records = _pretrain(run_dir, prefix, iters, extra, save_interval=1)
    saves = [r["checkpoint_save_seconds"] for r in records if "checkpoint_save_seconds" in r][1:]  # after the first
    steps = [r["step_time"] for r in records if "step_time" in r][1:]
    tag = run_dir / "checkpoints" / f"iter_{iters:07d}"
    names = checkpoint_files(tag)
    hashing_seconds = statistics.median(_timed(lambda: describe_files(tag, names)) for _ in range(3))
    save = statistics.median(saves)
    return {
        "checkpoint_mb": round(sum((tag / n).stat().st_size for n in names) / 2**20, 2),
        "save_seconds": round(save, 4),
        "checksum_seconds": round(hashing_seconds, 4),
        "checksum_share_of_save_percent": round(100 * hashing_seconds / save, 2),
        "step_seconds": round(statistics.median(steps), 4),
        "save_over_step": round(save / statistics.median(steps), 3),
    }


def _steps_during_writes(records: list[dict]) -> dict[int, set[int]]:
    """{iteration of a save: the iterations of the steps that ran while its write was in flight}:
    after the save, up to the step at whose boundary the write was found finished. A write found
    finished at a step boundary is logged just before that step's record; one that the next save (or
    the end of the run) waited for is logged after the last step's record, then that save's
    blocking time."""
    overlapped: dict[int, set[int]] = {}
    last_step = 0
    for n, r in enumerate(records):
        if "step_time" in r:
            last_step = r["iteration"]
        if "checkpoint_write_seconds" not in r:
            continue
        saved = r["iteration"]
        end = max(last_step, saved)
        for later in records[n + 1 :]:
            if "checkpoint_block_seconds" in later:  # the next save waited for it, after step `end`
                break
            if "step_time" in later:  # found finished at this step's boundary
                end = later["iteration"]
                break
        overlapped[saved] = set(range(saved + 1, end + 1))
    return overlapped


def async_saves(iters: int, directory: Path, prefix: Path, shape: list[str],
                config: str = "configs/tiny_cpu.yaml", save_interval: int = 32) -> dict[str, float]:  # fmt: skip
    """The same run with synchronous and with asynchronous saves. Normal steps: the synchronous run's
    (no write ever in flight during a step) and the asynchronous run's that no write overlapped;
    medians, as a step on this shared 2-core machine now and then takes twice as long."""
    sync = _pretrain(directory / "sync", prefix, iters, shape, config=config, save_interval=save_interval)
    shutil.rmtree(directory / "sync" / "checkpoints")  # a disk that holds one run's checkpoints is enough
    background = _pretrain(directory / "async", prefix, iters, [*shape, "checkpoint.async_save=true"], config=config,
                           save_interval=save_interval)  # fmt: skip
    saves = [r["checkpoint_save_seconds"] for r in sync if "checkpoint_save_seconds" in r]
    blocks = [r["checkpoint_block_seconds"] for r in background if "checkpoint_block_seconds" in r]
    writes = [r["checkpoint_write_seconds"] for r in background if "checkpoint_write_seconds" in r]
    by_save = _steps_during_writes(background)
    overlapped = set().union(*by_save.values())
    steps = {r["iteration"]: r["step_time"] for r in background if "step_time" in r and r["iteration"] > 2}
    during = [t for i, t in steps.items() if i in overlapped]
    normal = [t for i, t in steps.items() if i not in overlapped]
    sync_steps = [r["step_time"] for r in sync if "step_time" in r and r["iteration"] > 2]
    sync_save, median = statistics.median(saves), statistics.median
    out = {
        "sync_save_seconds": round(sync_save, 3),
        "async_block_seconds": round(median(blocks), 3),
        "async_block_over_sync_save": round(median(blocks) / sync_save, 3),
        "async_first_block_seconds": round(blocks[0], 3),
        "async_write_seconds": round(median(writes), 3),
        "steps_during_writes": len(during),
        "step_seconds_sync_run": round(median(sync_steps), 3),
        "step_seconds_async_run_no_write": round(median(normal), 3) if normal else None,
        "step_seconds_during_writes": round(median(during), 3) if during else None,
        "step_seconds_during_writes_mean": round(statistics.mean(during), 3) if during else None,
    }
    if during:
        out["step_slowdown_during_writes"] = round(median(during) / median(sync_steps) - 1, 3)
        if normal:
            out["step_slowdown_vs_async_run_no_write"] = round(median(during) / median(normal) - 1, 3)
        # The same iteration of the synchronous run did the same arithmetic on the same numbers: on a CPU
        # a step's time depends on them (denormal floats make later steps slower, docs/benchmarks.md).
        same = {r["iteration"]: r["step_time"] for r in sync if "step_time" in r}
        paired = [steps[i] / same[i] for i in steps if i in overlapped and i in same]
        out["step_slowdown_during_writes_same_iterations"] = round(median(paired) - 1, 3)
        # After the first save (which allocates the host buffers and starts the writer process): what
        # runs for the length of a training run. Extra: the steps' time beyond the synchronous run's.
        later = [sorted(by_save[k] & steps.keys() & same.keys()) for k in sorted(by_save)[1:]]
        later_paired = [steps[i] / same[i] for its in later for i in its]
        if later_paired:
            out["step_slowdown_during_later_writes_same_iterations"] = round(median(later_paired) - 1, 3)
            extra = [sum(steps[i] - same[i] for i in its) for its in later if its]
            out["extra_step_seconds_per_later_write"] = round(statistics.mean(extra), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the file hashed")
    parser.add_argument("--iters", type=int, default=8, help="training iterations, a save after each")
    parser.add_argument("--data", type=Path, default=PREFIX, help="token prefix (default: the built-in corpus)")
    parser.add_argument("--smoke", action="store_true", help="seconds: 16 MB, a tiny model, 3 saves")
    parser.add_argument("--async-only", action="store_true", help="only part 3, on --async-config")
    parser.add_argument("--async-config", default="configs/tiny_cpu.yaml",
                        help="with --async-only: the config trained (a GPU: configs/gpt2_125m.yaml)")
    parser.add_argument("--async-override", nargs="*", default=[],
                        help="with --async-only: overrides for it (default: the GPT-2 125M shape on tiny_cpu)")
    parser.add_argument("--async-iters", type=int, default=96, help="with --async-only: training iterations")
    parser.add_argument("--async-save-interval", type=int, default=32,
                        help="with --async-only: iterations between saves (longer than a write on a GPU)")
    args = parser.parse_args()
    if not args.data.with_suffix(".idx").exists():
        raise SystemExit(f"{args.data}.idx missing: run scripts/quickstart.sh (or preprocess_data.py) first")
    if args.async_only:
        with tempfile.TemporaryDirectory() as tmp:
            shape = args.async_override if args.async_config != "configs/tiny_cpu.yaml" else [*BIG, *args.async_override]
            result = async_saves(args.async_iters, Path(tmp), args.data, shape, args.async_config,
                                 save_interval=args.async_save_interval)  # fmt: skip
            report("checkpoint_io", {"async_saves": result})
        return
    gb, iters, extra = (1 / 64, 3, SMOKE) if args.smoke else (args.gb, args.iters, BENCH_SHAPE)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"hashing": hashing(gb, Path(tmp)), "tiny_cpu_saves": save_overhead(iters, Path(tmp) / "run",
                                                                                      args.data, extra)}  # fmt: skip
        results["async_saves"] = async_saves(8 if args.smoke else 96, Path(tmp), args.data, SMOKE if args.smoke else BIG,
                                             save_interval=4 if args.smoke else 32)  # fmt: skip
    report("checkpoint_io", results)


if __name__ == "__main__":
    main()
