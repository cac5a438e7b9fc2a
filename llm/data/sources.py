"""Streaming readers for corpus files: `.txt`, `.jsonl`, `.jsonl.gz`, `.parquet` and HF datasets.

Readers only split the input into records; decoding, JSON parsing and validation happen in the
preprocessing workers (`parse_record`), so that work runs in parallel. A record carries where it
came from (file and line) so that `--strict` can name the first bad one.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.errors import LLMError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet")
SKIP_REASONS = ("invalid_json", "missing_field", "not_a_string", "invalid_utf8", "nul_bytes", "empty_text")
NOT_TEXT = ("invalid_utf8", "nul_bytes")  # what binary input gives


class InputError(LLMError, ValueError):
    """An input path that is missing or of an unsupported kind."""


@dataclass(frozen=True)
class Record:
    kind: str  # "json" (raw line bytes), "text" (raw bytes), "str" (already decoded), "skip"
    payload: Any
    source: str
    line: int


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (searched recursively for supported suffixes) and globs, sorted."""
    files: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise InputError(f"input '{item}' matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and _kind_of(f))
                if not found:
                    raise InputError(f"input directory '{p}' holds no {', '.join(SUFFIXES)} file")
                files.extend(found)
            elif p.is_file():
                if not _kind_of(p):
                    raise InputError(f"input '{p}' is not one of {', '.join(SUFFIXES)}")
                files.append(p)
            else:
                raise InputError(f"input '{p}' does not exist")
    return files


def _jsonl_records(path: Path) -> Iterator[Record]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield Record("json", raw, str(path), lineno)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"'{path}' is not a complete gzip file ({e}); re-create or re-download it") from None


def _parquet_records(path: Path, key: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise InputError(f"'{path}' is not a readable parquet file ({e})") from None
    if key not in pf.schema_arrow.names:
        # Every row lacks the field: report each as skipped, like jsonl.
        for row in range(pf.metadata.num_rows):
            yield Record("skip", "missing_field", str(path), row + 1)
        return
    row = 0
    for batch in pf.iter_batches(columns=[key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield Record("str", value, str(path), row)


def iter_file_records(path: Path, *, json_key: str) -> Iterator[Record]:
    kind = _kind_of(path)
    if kind in (".jsonl", ".jsonl.gz", ".json"):
        yield from _jsonl_records(path)
    elif kind == ".parquet":
        yield from _parquet_records(path, json_key)
    else:  # one .txt file is one document
        yield Record("text", path.read_bytes(), str(path), 1)


def iter_hf_records(name: str, *, config: str | None, split: str, key: str) -> Iterator[Record]:
    """Rows of a Hugging Face dataset: a local `save_to_disk` directory, or a hub name when online."""
    import datasets

    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise InputError(f"dataset '{name}' has no split '{split}' (it has {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise InputError(f"cannot load Hugging Face dataset '{name}': {e}") from None
    for row, example in enumerate(ds, start=1):
        if key not in example:
            yield Record("skip", "missing_field", name, row)
        else:
            yield Record("str", example[key], name, row)


def parse_record(record: Record, json_key: str) -> tuple[str | None, str | None]:
    """Returns (text, None) or (None, skip reason)."""
    if record.kind == "skip":
        return None, record.payload
    if record.kind == "str":
        text = record.payload
        if not isinstance(text, str):
            return None, "missing_field" if text is None else "not_a_string"
    else:
        try:
            decoded = record.payload.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
        if record.kind == "json":
            try:
                obj = json.loads(decoded)
            except json.JSONDecodeError:
                return None, "invalid_json"
            if not isinstance(obj, dict) or json_key not in obj:
                return None, "missing_field"
            text = obj[json_key]
            if not isinstance(text, str):
                return None, "not_a_string"
        else:
            text = decoded
    if "\x00" in text:
        return None, "nul_bytes"
    if not text.strip():
        return None, "empty_text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON escape such as "\\ud800"
        return None, "invalid_utf8"
    return text, None
