"""Preprocessing throughput and memory.

  python benchmarks/preprocess_throughput.py --size-mb 100 --workers 1 2
  python benchmarks/preprocess_throughput.py --size-mb 1024 --workers 2 --skip-raw

Builds a jsonl corpus of about --size-mb by repeating the built-in corpus (each copy numbered so
documents differ), then measures:
- the tokenizer's raw encode speed on the same texts in one process (the limit for one worker),
- preprocess_data.py end to end for each --workers value: tokens/s, tokens/s per worker, and the
  peak resident memory of the main process and of the largest worker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, report

from llm.data.builtin_corpus import iter_documents
from llm.data.tokenizer import load_tokenizer

TOKENIZER = REPO / "tokenizer" / "llm_sp8k.model"


def make_corpus(path: Path, size_mb: int) -> int:
    docs = list(iter_documents())
    written = copy = 0
    with path.open("w") as f:
        while written < size_mb << 20:
            for d in docs:
                line = json.dumps({"text": f"[{copy}] {d}"}) + "\n"
                f.write(line)
                written += len(line)
            copy += 1
    return written


def raw_encode_rate(path: Path, limit_mb: int = 64) -> float:
    tok = load_tokenizer(TOKENIZER)
    texts, size = [], 0
    with path.open() as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > limit_mb << 20:
                break
    start = time.perf_counter()
    n = sum(len(ids) + 1 for ids in tok.encode_batch(texts))
    return n / (time.perf_counter() - start)


def run_preprocess(path: Path, out: Path, workers: int) -> dict[str, float | None]:
    cmd = [sys.executable, str(REPO / "scripts" / "preprocess_data.py"), "--input", str(path), "--tokenizer",
           str(TOKENIZER), "--output-prefix", str(out), "--workers", str(workers), "--no-progress"]  # fmt: skip
    # Peak RSS of the main process and the largest worker, via /usr/bin/time when available.
    wrapper = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    p = subprocess.run(wrapper + cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    summary = next(line for line in p.stdout.splitlines() if line.startswith("documents:"))
    tokens = int(summary.split("tokens: ")[1].split(",")[0])
    # GNU time reports the largest RSS of the process tree it waited for (main or any worker).
    peak_kb = next((int(x.split(":")[1]) for x in p.stderr.splitlines() if "Maximum resident" in x), 0)
    result: dict[str, float | None] = {
        "workers": workers,
        "seconds": round(seconds, 1),
        "tokens": tokens,
        "tokens_per_sec": round(tokens / seconds),
        "tokens_per_sec_per_worker": round(tokens / seconds / workers),
        "peak_rss_mb_largest_process": round(peak_kb / 1024, 1) if peak_kb else None,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="seconds: 1 MB, one worker")
    args = parser.parse_args()
    if args.smoke:
        args.size_mb, args.workers = 1, [1]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        size = make_corpus(corpus, args.size_mb)
        results: dict[str, object] = {"corpus_bytes": size}
        if not args.skip_raw:
            results["raw_encode_tokens_per_sec"] = round(raw_encode_rate(corpus))
        runs = [run_preprocess(corpus, Path(tmp) / f"out{w}", w) for w in args.workers]
        results["runs"] = runs
        if not args.skip_raw:
            raw = float(results["raw_encode_tokens_per_sec"])  # type: ignore[arg-type]
            results["per_worker_fraction_of_raw"] = [
                round(float(r["tokens_per_sec_per_worker"] or 0) / raw, 3) for r in runs
            ]
    report("preprocess_throughput", results)


if __name__ == "__main__":
    main()
