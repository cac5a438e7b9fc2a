"""Corpus -> `PREFIX.bin/.idx`: streaming, parallel, deterministic, atomic.

The main process reads records and groups them into batches; workers decode, validate and
tokenize a batch each; results come back in submission order and are appended by one writer.
At most `2 x workers` batches are in flight, so memory stays bounded by
`2 x workers x batch size` whatever the corpus size, and output is byte-identical for any
number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm.data.indexed_dataset import IndexedDatasetBuilder, dtype_for_vocab
from llm.data.sources import NOT_TEXT, Record, parse_record
from llm.data.tokenizer import load_tokenizer
from llm.errors import LLMError

BATCH_DOCS = 256
BATCH_BYTES = 4 << 20


# A file is not text when more than this fraction of its records are binary (NUL bytes, invalid
# UTF-8), counted once it has given FRACTION_FROM records; a smaller file when most of them are. Judged
# after a file's first EARLY_RECORDS records (binary input fails fast) and at its end.
MAX_NOT_TEXT_FRACTION = 0.1
FRACTION_FROM = 100
EARLY_RECORDS = 1000


class StrictModeError(LLMError, ValueError):
    """--strict and a malformed record: names the file, line and reason."""


class NotTextError(LLMError, ValueError):
    """An input file that is binary rather than text, or input that gives no document at all."""


class _SourceCheck:
    """Per input file: how many records it gave and how many of them were not text."""

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction
        self.source: str | None = None
        self.records = 0
        self.not_text = 0

    def add(self, source: str, reason: str | None) -> None:
        if source != self.source:
            self.finish()
            self.source, self.records, self.not_text = source, 0, 0
        self.records += 1
        self.not_text += reason in NOT_TEXT
        if self.records == EARLY_RECORDS:
            self._judge()

    def finish(self) -> None:
        if self.source is not None:
            self._judge()

    def _judge(self) -> None:
        fraction = self.max_fraction if self.records >= FRACTION_FROM else 0.5
        if self.not_text > fraction * self.records:
            raise NotTextError(
                f"'{self.source}' does not look like text: {self.not_text} of its {self.records} records hold "
                f"NUL bytes or invalid UTF-8 (more than {fraction:.0%}); remove it from the input or "
                "convert it to UTF-8 text. Nothing was written"
            )


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (
            f"documents: {self.documents}, tokens: {self.tokens}, skipped: {skipped} ({reasons}), "
            f"time: {self.seconds:.1f}s, tokens/s: {rate:,.0f}"
        )


# A worker process loads its tokenizer once (pool initializer); the main process uses its own.
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(tokenizer_spec: str, json_key: str) -> None:
    _WORKER_STATE["tokenizer"] = load_tokenizer(tokenizer_spec)
    _WORKER_STATE["json_key"] = json_key


Result = tuple[np.ndarray | None, str | None, str, int]


def _process_batch(records: list[Record]) -> list[Result]:
    tok = _WORKER_STATE["tokenizer"]
    key = _WORKER_STATE["json_key"]
    parsed = [parse_record(r, key) for r in records]
    texts = [text for text, _ in parsed if text is not None]
    encoded = iter(tok.encode_batch(texts)) if texts else iter(())
    eos = tok.eos_id
    dtype = dtype_for_vocab(tok.vocab_size)
    out: list[Result] = []
    for record, (text, reason) in zip(records, parsed):
        if text is None:
            out.append((None, reason, record.source, record.line))
            continue
        ids = next(encoded)
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = eos
        out.append((arr, None, record.source, record.line))
    return out


def _batches(records: Iterable[Record]) -> Iterator[list[Record]]:
    batch: list[Record] = []
    size = 0
    for r in records:
        batch.append(r)
        size += len(r.payload) if isinstance(r.payload, (bytes, str)) else 0
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _map_ordered(
    batches: Iterator[list[Record]], workers: int, init_args: tuple[str, str]
) -> Iterator[list[Result]]:
    if workers <= 1:
        _init_worker(*init_args)
        for b in batches:
            yield _process_batch(b)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque[Any] = deque()
        for b in batches:
            pending.append(pool.apply_async(_process_batch, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(
    records: Iterable[Record],
    *,
    tokenizer: str,
    output_prefix: str | Path,
    workers: int = 1,
    json_key: str = "text",
    strict: bool = False,
    progress: bool = True,
    max_not_text: float = MAX_NOT_TEXT_FRACTION,
) -> PreprocessStats:
    """Tokenizes every record and writes `output_prefix.bin/.idx` atomically. Binary input (a file
    more than `max_not_text` of whose records are not text) and input that gives no document are
    errors (NotTextError); the output is then never written."""
    from tqdm import tqdm

    tok = load_tokenizer(tokenizer)
    builder = IndexedDatasetBuilder(output_prefix, dtype=dtype_for_vocab(tok.vocab_size))
    stats = PreprocessStats()
    check = _SourceCheck(max_not_text)
    start = time.perf_counter()
    bar = tqdm(unit=" docs", disable=not progress, mininterval=1.0, dynamic_ncols=True)
    try:
        for results in _map_ordered(_batches(records), workers, (tokenizer, json_key)):
            for tokens, reason, source, line in results:
                check.add(source, reason)
                if tokens is None:
                    if strict:
                        raise StrictModeError(f"{source}:{line}: malformed record ({reason})")
                    stats.skipped[reason or "unknown"] += 1
                    continue
                builder.add_document(tokens)
                stats.documents += 1
                stats.tokens += int(tokens.size)
            bar.update(len(results))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats.tokens / max(elapsed, 1e-9):,.0f} tokens/s", refresh=False)
        check.finish()
        if stats.documents == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items())) or "the input is empty"
            hint = (
                f"; no record has a field '{json_key}': name the text field with --json-key"
                if set(stats.skipped) == {"missing_field"}
                else ""
            )
            raise NotTextError(f"the input gave no document ({reasons}); nothing was written{hint}")
        builder.finalize()
    except BaseException:
        builder.abort()
        raise
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
