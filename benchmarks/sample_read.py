"""Random sample read latency from a large token file.

  python benchmarks/sample_read.py --tokens 500000000 --seq-length 2048

Writes a synthetic .bin/.idx of --tokens tokens (random document lengths), builds a GPTDataset over
it and times random `ds[i]` reads (page cache warm and, on Linux, after dropping this file's pages
with posix_fadvise).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import report

from llm.data.gpt_dataset import GPTDataset
from llm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def write_tokens(prefix: Path, total: int) -> None:
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
    written = 0
    chunk = rng.integers(0, 32000, size=1 << 20, dtype=np.uint16)
    while written < total:
        n = min(total - written, int(rng.integers(50, 5000)))
        start = int(rng.integers(0, len(chunk) - n))
        builder.add_document(chunk[start : start + n])
        written += n
    builder.finalize()


def time_reads(ds: GPTDataset, n: int, seed: int) -> float:
    idx = np.random.default_rng(seed).integers(0, len(ds), size=n)
    start = time.perf_counter()
    for i in idx:
        ds[int(i)]
    return (time.perf_counter() - start) / n * 1e6


def drop_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=500_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--smoke", action="store_true", help="seconds: 200k tokens, 200 reads")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.seq_length, args.reads = 200_000, 128, 200
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "big"
        write_tokens(prefix, args.tokens)
        data = IndexedDataset(prefix)
        samples = (data.num_tokens - 1) // args.seq_length
        start = time.perf_counter()
        ds = GPTDataset(data, doc_range=(0, len(data)), seq_length=args.seq_length, num_samples=samples, seed=0,
                        cache_dir=Path(tmp) / "cache")  # fmt: skip
        build = time.perf_counter() - start
        cold = time_reads(ds, 2000, 1) if drop_cache(prefix.with_suffix(".bin")) else None
        warm = time_reads(ds, args.reads, 2)
        report("sample_read", {
            "bin_bytes": prefix.with_suffix(".bin").stat().st_size, "documents": len(data), "samples": samples,
            "seq_length": args.seq_length, "index_build_seconds": round(build, 2),
            "us_per_sample_after_fadvise_dontneed": None if cold is None else round(cold, 1),
            "us_per_sample_warm": round(warm, 1),
        })  # fmt: skip


if __name__ == "__main__":
    main()
