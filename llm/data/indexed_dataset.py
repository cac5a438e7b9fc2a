"""Memory-mapped token files in Megatron-LM's indexed format: `PREFIX.bin` (tokens) and `PREFIX.idx`.

The format is Megatron-Core's (`megatron/core/datasets/indexed_dataset.py`) and GPT-NeoX's
"mmap" format, so corpora tokenized by either open here and ours open there. All integers are
little-endian:

    PREFIX.idx
      offset       size   field
      0            9      magic b"MMIDIDX\\x00\\x00"
      9            8      uint64 version (1)
      17           1      uint8 dtype code of the tokens (table `DTYPE_CODES`)
      18           8      uint64 S, the number of sequences
      26           8      uint64 D, the number of document boundaries (documents + 1)
      34           4S     int32 sequence lengths in tokens
      34+4S        8S     int64 sequence pointers: byte offset of each sequence in the .bin
      34+12S       8D     int64 document indices: document k is sequences [di[k], di[k+1]),
                          di[0] = 0, di[D-1] = S
      (34+20S      S      int8 sequence modes, multimodal files only; not used for text)
    PREFIX.bin
      the sequences back to back, nothing else

A document is one or more sequences (Megatron's `--split-sentences` makes one per sentence); `llm`
trains on documents, so a document's sentences stay together and in order. preprocess_data.py
writes one sequence per document, uint16 tokens when the vocabulary fits (else int32, as
Megatron does), and appends the tokenizer's EOS to every document.

Dtype code 7 is float32 in Megatron-Core but float64 in GPT-NeoX and older Megatron-LM; the .bin
size tells which. Files of llm's own earlier format (magic `LLMTOKS`) still load.

The reader maps both files without copying and checks every invariant that is cheap to check, so
a truncated, mismatched or corrupt pair fails at open with one message naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from llm.data.files import temporary_file
from llm.errors import LLMError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D  (34 bytes)
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}  # fmt: skip
WRITE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
FOREIGN_MAGICS = {
    b"TNTIDX\x00\x00": "the old fairseq/Megatron 'lazy'/'cached' index format, which llm does not read; "
    "re-tokenize with scripts/preprocess_data.py (or Megatron's tools with --dataset-impl mmap)",
}

# llm's format before it adopted Megatron's (read only)
LEGACY_MAGIC = b"LLMTOKS\x00"
LEGACY_HEADER = struct.Struct("<8sIB3xQQ")  # magic, version, dtype code, N, T  (32 bytes)
LEGACY_DTYPES: dict[int, type[np.number]] = {1: np.uint16, 2: np.uint32}

_CHUNK = 1 << 20


class IndexedDatasetError(LLMError, ValueError):
    """A missing, truncated or corrupt token file; the message names it."""


def dtype_for_vocab(vocab_size: int) -> type[np.integer]:
    """uint16 when every token id fits, else int32 (Megatron's choice; no format has uint32)."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def dataset_exists(prefix: str | Path) -> bool:
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


def _tmp(directory: Path, name: str, suffix: str) -> Path:
    fd, tmp = temporary_file(directory, prefix=f".{name}.", suffix=suffix + ".tmp")
    os.close(fd)
    return tmp


def write_index(
    path: str | Path,
    dtype: type[np.number],
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray | None = None,
) -> None:
    """Writes a Megatron .idx for sequences of `sequence_lengths` tokens (in memory; the builder
    streams instead). `document_indices` defaults to one document per sequence."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    docs = (
        np.arange(len(lengths) + 1, dtype=np.int64)
        if document_indices is None
        else np.asarray(document_indices)
    )
    itemsize = np.dtype(dtype).itemsize
    code = {np.dtype(v): k for k, v in DTYPE_CODES.items()}[np.dtype(dtype)]
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, code, len(lengths), len(docs)))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(docs.astype(np.int64).tobytes())


class IndexedDatasetBuilder:
    """Writes a token file pair with memory independent of the number of documents.

    Tokens and document lengths stream to temporary files next to the target; `finalize()`
    writes the index and renames both files into place (the .idx last), so an interrupted
    build never leaves a pair that looks valid.
    """

    def __init__(self, prefix: str | Path, *, dtype: type[np.number]) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in WRITE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}; use uint16 or int32")
        directory = self.prefix.parent
        directory.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _tmp(directory, self.prefix.name, ".bin")
        self._len_tmp = _tmp(directory, self.prefix.name, ".lens")
        self._bin: BinaryIO = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self._lens: BinaryIO = open(self._len_tmp, "wb")  # noqa: SIM115
        self.num_docs = 0
        self.num_tokens = 0
        info = np.iinfo(self.dtype)
        self._min_id, self._max_id = int(max(info.min, 0)), int(info.max)

    def add_document(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and (int(arr.max()) > self._max_id or int(arr.min()) < self._min_id):
            raise ValueError(f"token id out of range for {self.dtype}")
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"a document of {arr.size} tokens is longer than the format allows (2^31 - 1)")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self._lens.write(np.int64(arr.size).tobytes())
        self.num_docs += 1
        self.num_tokens += int(arr.size)

    def finalize(self) -> None:
        self._bin.close()
        self._lens.close()
        idx_tmp = _tmp(self.prefix.parent, self.prefix.name, ".idx")
        n = self.num_docs
        with open(idx_tmp, "wb") as out:
            out.write(HEADER.pack(MAGIC, VERSION, WRITE_CODES[self.dtype], n, n + 1))
            with open(self._len_tmp, "rb") as lens:  # int32 sequence lengths
                while chunk := lens.read(8 * _CHUNK):
                    out.write(np.frombuffer(chunk, dtype=np.int64).astype(np.int32).tobytes())
            with open(self._len_tmp, "rb") as lens:  # int64 byte pointers (exclusive running sum)
                running = 0
                while chunk := lens.read(8 * _CHUNK):
                    nbytes = np.frombuffer(chunk, dtype=np.int64) * self.dtype.itemsize
                    ends = np.cumsum(nbytes) + running
                    out.write((ends - nbytes).tobytes())
                    running = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):  # one document per sequence
                out.write(np.arange(start, min(start + _CHUNK, n + 1), dtype=np.int64).tobytes())
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


def _corrupt(path: Path, what: str) -> IndexedDatasetError:
    return IndexedDatasetError(
        f"'{path}' {what}: truncated or corrupt; rebuild it with scripts/preprocess_data.py"
    )


def missing_token_file(prefix: str | Path) -> str | None:
    """What IndexedDataset(prefix) says of a missing .idx or .bin (None: both are there)."""
    for p in (idx_path(prefix), bin_path(prefix)):
        if not p.is_file():
            return f"token file '{p}' not found; create it with scripts/preprocess_data.py --output-prefix {prefix}"
    return None


class IndexedDataset:
    """Zero-copy reader: `ds[i]` is document i as a read-only numpy view into the .bin mapping.

    `offsets` (int64, documents + 1) are the documents' token offsets in the .bin;
    `sequence_lengths` and `document_indices` are the index's own arrays (Megatron's view).
    `random_access=True` (training) turns the kernel's read-ahead off for the .bin mapping."""

    def __init__(self, prefix: str | Path, *, random_access: bool = False) -> None:
        self.prefix = str(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        missing = missing_token_file(prefix)
        if missing is not None:
            raise IndexedDatasetError(missing)
        size = ipath.stat().st_size
        with open(ipath, "rb") as f:
            head = f.read(HEADER.size)
        if head[:8] == LEGACY_MAGIC:
            self._open_legacy(ipath, bpath, size)
        else:
            self._open_megatron(ipath, bpath, size, head)
        self.tokens: np.ndarray = self._map_tokens(bpath, random_access)

    def _map_tokens(self, bpath: Path, random_access: bool) -> np.ndarray:
        if not self.num_tokens:  # an empty .bin cannot be memory-mapped; an empty array stands in
            return np.zeros(0, dtype=self.dtype)
        with open(bpath, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if random_access and hasattr(mapping, "madvise"):
            # Training reads windows at random places: no read-ahead. With it each first touch of a
            # page pulls the device's whole read-ahead window (8 MB on some cloud disks) into memory.
            mapping.madvise(mmap.MADV_RANDOM)
        return np.frombuffer(mapping, dtype=self.dtype)

    def _open_megatron(self, ipath: Path, bpath: Path, size: int, head: bytes) -> None:
        if len(head) < HEADER.size:
            if head[:9] != MAGIC[: len(head)]:
                raise IndexedDatasetError(
                    f"'{ipath}' is not a token index (bad magic); rebuild it with preprocess_data"
                )
            raise _corrupt(ipath, f"has {size} bytes, fewer than the {HEADER.size}-byte header")
        magic, version, code, n_seq, n_doc = HEADER.unpack(head)
        if magic != MAGIC:
            foreign = FOREIGN_MAGICS.get(magic[:8])
            if foreign:
                raise IndexedDatasetError(f"'{ipath}' is {foreign}")
            raise IndexedDatasetError(
                f"'{ipath}' is not a Megatron/llm token index (bad magic {magic[:8]!r}); rebuild it with preprocess_data"
            )
        if version != VERSION:
            raise IndexedDatasetError(
                f"'{ipath}' has index format version {version}; llm reads version {VERSION} of Megatron's format"
            )
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"'{ipath}' has token dtype code {code}, which the format does not define (codes 1-8): corrupt "
                "or written by a newer tool; rebuild it"
            )
        base = HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size not in (base, base + n_seq) or n_doc < 1:
            raise _corrupt(ipath, f"has {size} bytes but its header promises {base} ({n_seq} sequences, "
                                  f"{max(n_doc - 1, 0)} documents)")  # fmt: skip
        raw = np.memmap(ipath, dtype=np.uint8, mode="r")
        self.sequence_lengths: np.ndarray = np.frombuffer(raw, np.int32, n_seq, HEADER.size)
        pointers = np.frombuffer(raw, np.int64, n_seq, HEADER.size + 4 * n_seq)
        self.document_indices: np.ndarray = np.frombuffer(raw, np.int64, n_doc, HEADER.size + 12 * n_seq)
        di = self.document_indices
        if di[0] != 0 or di[-1] != n_seq or np.any(di[1:] < di[:-1]):
            raise _corrupt(ipath, "has inconsistent document indices")
        if np.any(self.sequence_lengths < 0):
            raise _corrupt(ipath, "has negative sequence lengths")
        starts = np.zeros(n_seq + 1, dtype=np.int64)  # token offset of every sequence
        np.cumsum(self.sequence_lengths, out=starts[1:])
        total = int(starts[-1])
        actual = bpath.stat().st_size
        dtype = np.dtype(DTYPE_CODES[code])
        if code == 7 and actual == total * 8 and total:
            dtype = np.dtype(np.float64)  # GPT-NeoX's and old Megatron-LM's code 7
        if actual != total * dtype.itemsize:
            raise IndexedDatasetError(
                f"'{bpath}' has {actual} bytes but '{ipath}' promises {total * dtype.itemsize} ({total} tokens "
                f"of {dtype}): {'truncated' if actual < total * dtype.itemsize else 'longer than its index'} "
                "or from another build; rebuild both"
            )
        if not np.array_equal(pointers, starts[:-1] * dtype.itemsize):
            raise _corrupt(ipath, "has sequence pointers that do not follow its sequence lengths")
        self.dtype = dtype
        self.num_tokens = total
        self.format = "megatron"
        one_per_doc = n_doc == n_seq + 1 and bool(np.array_equal(di, np.arange(n_doc)))
        self.offsets: np.ndarray = starts if one_per_doc else starts[di]

    def _open_legacy(self, ipath: Path, bpath: Path, size: int) -> None:
        if size < LEGACY_HEADER.size:
            raise _corrupt(ipath, f"has {size} bytes, fewer than the {LEGACY_HEADER.size}-byte header")
        with open(ipath, "rb") as f:
            _, version, code, n_docs, n_tokens = LEGACY_HEADER.unpack(f.read(LEGACY_HEADER.size))
        if version != 1:
            raise IndexedDatasetError(
                f"'{ipath}' has llm token format version {version}; this llm reads version 1"
            )
        if code not in LEGACY_DTYPES:
            raise _corrupt(ipath, f"has unknown dtype code {code}")
        expected = LEGACY_HEADER.size + 8 * (n_docs + 1)
        if size != expected:
            raise _corrupt(ipath, f"has {size} bytes but its header promises {expected} ({n_docs} documents)")
        self.dtype = np.dtype(LEGACY_DTYPES[code])
        self.offsets = np.memmap(
            ipath, dtype=np.int64, mode="r", offset=LEGACY_HEADER.size, shape=(n_docs + 1,)
        )
        if (
            self.offsets[0] != 0
            or self.offsets[-1] != n_tokens
            or np.any(self.offsets[1:] < self.offsets[:-1])
        ):
            raise _corrupt(ipath, "has inconsistent document offsets")
        expected = n_tokens * self.dtype.itemsize
        actual = bpath.stat().st_size
        if actual != expected:
            raise IndexedDatasetError(
                f"'{bpath}' has {actual} bytes but '{ipath}' promises {expected} ({n_tokens} tokens): "
                "truncated or from another build; rebuild both"
            )
        self.num_tokens = int(n_tokens)
        self.format = "llm-v1"
        self.sequence_lengths = np.diff(self.offsets).astype(np.int32)
        self.document_indices = np.arange(n_docs + 1, dtype=np.int64)

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
