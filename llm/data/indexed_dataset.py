"""Memory-mapped token files: `PREFIX.bin` (tokens) and `PREFIX.idx` (document boundaries).

Format, version 1 (all integers little-endian):

    PREFIX.idx
      offset  size  field
      0       8     magic b"LLMTOKS\\0"
      8       4     uint32 version (1)
      12      1     uint8 dtype code: 1 = uint16, 2 = uint32
      13      3     zero padding
      16      8     uint64 number of documents N
      24      8     uint64 number of tokens T
      32      8(N+1) int64 document offsets in tokens: doc i is tokens[off[i]:off[i+1]],
                     off[0] = 0, off[N] = T, non-decreasing
    PREFIX.bin
      T tokens of the dtype, back to back, nothing else (size = T * itemsize)

Every document ends with the tokenizer's EOS (preprocessing appends it). The reader maps both
files without copying and checks every invariant above that is cheap to check, so a truncated,
mismatched or corrupt pair fails at open with a message naming the file.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llm.errors import LLMError

MAGIC = b"LLMTOKS\x00"
VERSION = 1
HEADER = struct.Struct("<8sIB3xQQ")  # magic, version, dtype code, N, T  (32 bytes)
DTYPES: dict[int, type[np.unsignedinteger]] = {1: np.uint16, 2: np.uint32}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class IndexedDatasetError(LLMError, ValueError):
    """A missing, truncated or corrupt token file; the message names it."""


def dtype_for_vocab(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every token id fits, else uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def dataset_exists(prefix: str | Path) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


class IndexedDatasetBuilder:
    """Writes a token file pair with memory independent of the number of documents.

    Tokens and document lengths stream to temporary files next to the target; `finalize()`
    writes the index and renames both files into place (the .idx last), so an interrupted
    build never leaves a pair that looks valid.
    """

    def __init__(self, prefix: str | Path, *, dtype: type[np.unsignedinteger]) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        directory = self.prefix.parent
        directory.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self._tmp(directory, ".bin")
        self._len_tmp = self._tmp(directory, ".lens")
        self._bin: BinaryIO = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self._lens: BinaryIO = open(self._len_tmp, "wb")  # noqa: SIM115
        self.num_docs = 0
        self.num_tokens = 0
        self._max_id = int(np.iinfo(self.dtype).max)

    def _tmp(self, directory: Path, suffix: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=f".{self.prefix.name}.", suffix=suffix + ".tmp", dir=directory)
        os.close(fd)
        return Path(name)

    def add_document(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and (int(arr.max()) > self._max_id or int(arr.min()) < 0):
            raise ValueError(f"token id out of range for {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._lens.write(np.int64(arr.size).tobytes())
        self.num_docs += 1
        self.num_tokens += int(arr.size)

    def finalize(self) -> None:
        self._bin.close()
        self._lens.close()
        idx_tmp = self._tmp(self.prefix.parent, ".idx")
        with open(idx_tmp, "wb") as out, open(self._len_tmp, "rb") as lens:
            out.write(HEADER.pack(MAGIC, VERSION, CODES[self.dtype], self.num_docs, self.num_tokens))
            out.write(np.int64(0).tobytes())
            running = 0
            while chunk := lens.read(8 * 1_000_000):
                offsets = np.cumsum(np.frombuffer(chunk, dtype=np.int64)) + running
                running = int(offsets[-1])
                out.write(offsets.tobytes())
            out.flush()
            os.fsync(out.fileno())
        self._len_tmp.unlink()
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))

    def abort(self) -> None:
        for f in (self._bin, self._lens):
            f.close()
        for p in (self._bin_tmp, self._len_tmp):
            p.unlink(missing_ok=True)


def _read_header(path: Path) -> tuple[int, int, int, int]:
    size = path.stat().st_size
    if size < HEADER.size:
        raise IndexedDatasetError(
            f"'{path}' is truncated ({size} bytes, header needs {HEADER.size}); rebuild it"
        )
    with open(path, "rb") as f:
        magic, version, code, n_docs, n_tokens = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise IndexedDatasetError(
            f"'{path}' is not an llm token index (bad magic); rebuild it with preprocess_data"
        )
    if version != VERSION:
        raise IndexedDatasetError(f"'{path}' has format version {version}; this llm reads version {VERSION}")
    if code not in DTYPES:
        raise IndexedDatasetError(f"'{path}' has unknown dtype code {code}; the file is corrupt, rebuild it")
    expected = HEADER.size + 8 * (n_docs + 1)
    if size != expected:
        raise IndexedDatasetError(
            f"'{path}' has {size} bytes but its header promises {expected} ({n_docs} documents): "
            "truncated or corrupt; rebuild it"
        )
    return code, n_docs, n_tokens, size


class IndexedDataset:
    """Zero-copy reader: `ds[i]` is document i as a read-only numpy view into the .bin mapping."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise IndexedDatasetError(
                    f"token file '{p}' not found; create it with scripts/preprocess_data.py --output-prefix {prefix}"
                )
        code, n_docs, n_tokens, _ = _read_header(ipath)
        self.dtype = np.dtype(DTYPES[code])
        self.offsets: np.ndarray = np.memmap(
            ipath, dtype=np.int64, mode="r", offset=HEADER.size, shape=(n_docs + 1,)
        )
        if (
            self.offsets[0] != 0
            or self.offsets[-1] != n_tokens
            or np.any(self.offsets[1:] < self.offsets[:-1])
        ):
            raise IndexedDatasetError(f"'{ipath}' has inconsistent document offsets: corrupt; rebuild it")
        expected = n_tokens * self.dtype.itemsize
        actual = bpath.stat().st_size
        if actual != expected:
            raise IndexedDatasetError(
                f"'{bpath}' has {actual} bytes but '{ipath}' promises {expected} ({n_tokens} tokens): "
                "truncated or from another build; rebuild both"
            )
        self.num_tokens = int(n_tokens)
        # An empty .bin cannot be memory-mapped; an empty array stands in for it.
        self.tokens: np.ndarray = (
            np.memmap(bpath, dtype=self.dtype, mode="r") if n_tokens else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        start = int(self.offsets[doc]) + offset
        end = int(self.offsets[doc + 1]) if length is None else start + length
        return self.tokens[start:end]
