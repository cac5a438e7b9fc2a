from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from llm.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    dtype_for_vocab,
    write_index,
)


def _write(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> None:
    b = IndexedDatasetBuilder(prefix, dtype=dtype)
    for d in docs:
        b.add_document(np.asarray(d))
    b.finalize()


def _megatron_idx(dtype_code: int, lengths: list[int], doc_idx: list[int], itemsize: int) -> bytes:
    """The .idx bytes computed from the format's specification (not from our writer)."""
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * itemsize
    return (
        b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, dtype_code, len(lengths), len(doc_idx))
        + np.asarray(lengths, np.int32).tobytes() + pointers.tobytes() + np.asarray(doc_idx, np.int64).tobytes()
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_reader_round_trip(tmp_path: Path, dtype) -> None:
    rng = np.random.default_rng(0)
    hi = 60000 if dtype == np.uint16 else 100000
    docs = [rng.integers(0, hi, size=n).tolist() for n in (5, 1, 300, 0, 17)]
    _write(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype) and ds.format == "megatron"
    assert ds.num_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.get(2, 10, 5).tolist() == docs[2][10:15]
    assert ds.doc_lengths.tolist() == [len(d) for d in docs]
    assert not ds[2].flags.writeable  # zero-copy read-only view of the mapping
    # the bytes are exactly Megatron's layout: one sequence per document
    code = 8 if dtype == np.uint16 else 4
    lengths = [len(d) for d in docs]
    assert (tmp_path / "d.idx").read_bytes() == _megatron_idx(
        code, lengths, list(range(6)), np.dtype(dtype).itemsize
    )
    assert (tmp_path / "d.bin").read_bytes() == np.concatenate([np.asarray(d) for d in docs]).astype(
        dtype
    ).tobytes()


def test_dtype_choice() -> None:
    assert dtype_for_vocab(65536) is np.uint16
    assert dtype_for_vocab(65537) is np.int32


def test_documents_of_several_sequences_and_every_dtype_code(tmp_path: Path) -> None:
    tokens = np.arange(1, 13)
    lengths, doc_idx = [2, 3, 0, 4, 3], [0, 2, 2, 4, 5]  # doc 0: seqs 0-1, doc 1: empty, doc 2: 2-3, doc 3: 4
    want = [[1, 2, 3, 4, 5], [], [6, 7, 8, 9], [10, 11, 12]]
    for code, dtype in [(1, np.uint8), (2, np.int8), (3, np.int16), (4, np.int32), (5, np.int64), (6, np.float64),
                        (7, np.float32), (8, np.uint16)]:  # fmt: skip
        prefix = tmp_path / f"c{code}"
        Path(f"{prefix}.idx").write_bytes(_megatron_idx(code, lengths, doc_idx, np.dtype(dtype).itemsize))
        Path(f"{prefix}.bin").write_bytes(tokens.astype(dtype).tobytes())
        ds = IndexedDataset(prefix)
        assert ds.dtype == np.dtype(dtype) and [ds[i].tolist() for i in range(len(ds))] == want, code
        assert ds.sequence_lengths.tolist() == lengths and ds.document_indices.tolist() == doc_idx
    # GPT-NeoX and older Megatron-LM write float64 under code 7: the .bin size tells
    Path(tmp_path / "neox.idx").write_bytes(_megatron_idx(7, lengths, doc_idx, 8))
    Path(tmp_path / "neox.bin").write_bytes(tokens.astype(np.float64).tobytes())
    ds = IndexedDataset(tmp_path / "neox")
    assert ds.dtype == np.float64 and ds[3].tolist() == [10, 11, 12]
    # write_index (used by benchmarks for synthetic corpora) writes the same bytes
    write_index(tmp_path / "w.idx", np.int16, np.asarray(lengths), np.asarray(doc_idx))
    assert (tmp_path / "w.idx").read_bytes() == (tmp_path / "c3.idx").read_bytes()


def test_llm_v1_files_still_load(tmp_path: Path) -> None:
    docs = [[5, 6, 7], [8], [9, 10]]
    offsets = np.array([0, 3, 4, 6], dtype=np.int64)
    (tmp_path / "old.idx").write_bytes(
        struct.pack("<8sIB3xQQ", b"LLMTOKS\x00", 1, 1, 3, 6) + offsets.tobytes()
    )
    (tmp_path / "old.bin").write_bytes(np.asarray(sum(docs, []), np.uint16).tobytes())
    ds = IndexedDataset(tmp_path / "old")
    assert ds.format == "llm-v1" and [ds[i].tolist() for i in range(3)] == docs and ds.num_tokens == 6


def test_no_output_until_finalize_and_abort_cleans_up(tmp_path: Path) -> None:
    b = IndexedDatasetBuilder(tmp_path / "d", dtype=np.uint16)
    b.add_document(np.arange(10))
    assert not (tmp_path / "d.bin").exists() and not (tmp_path / "d.idx").exists()
    b.abort()
    assert list(tmp_path.iterdir()) == []


def test_token_out_of_range_rejected(tmp_path: Path) -> None:
    b = IndexedDatasetBuilder(tmp_path / "d", dtype=np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        b.add_document(np.asarray([70000]))
    b.abort()


def test_truncated_and_corrupt_files_are_rejected_clearly(tmp_path: Path) -> None:
    _write(tmp_path / "d", [[1, 2, 3], [4, 5]])
    idx, binf = tmp_path / "d.idx", tmp_path / "d.bin"
    good_idx, good_bin = idx.read_bytes(), binf.read_bytes()

    def refused(data: bytes, pattern: str, *, bin_data: bytes = good_bin) -> None:
        idx.write_bytes(data)
        binf.write_bytes(bin_data)
        with pytest.raises(IndexedDatasetError, match=pattern) as e:
            IndexedDataset(tmp_path / "d")
        assert "\n" not in str(e.value)

    refused(
        good_idx,
        r"d\.bin' has 8 bytes but .*d\.idx' promises 10 \(5 tokens of uint16\): truncated",
        bin_data=good_bin[:-2],
    )
    refused(good_idx, r"d\.bin' has 12 bytes .* longer than its index", bin_data=good_bin + b"\0\0")
    refused(good_idx[:-8], r"d\.idx' has 74 bytes but its header promises 82 .*truncated or corrupt")
    refused(b"XXXXXXXX" + good_idx[8:], "not a Megatron/llm token index \\(bad magic")
    refused(good_idx[:10], "fewer than the 34-byte header")
    refused(
        good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:], "index format version 2; llm reads version 1"
    )
    refused(
        good_idx[:17] + bytes([9]) + good_idx[18:], "token dtype code 9, which the format does not define"
    )
    refused(b"TNTIDX\x00\x00" + good_idx[8:], "old fairseq/Megatron 'lazy'/'cached' index format")
    corrupt = bytearray(good_idx)
    corrupt[34 + 8 + 16 + 8 : 34 + 8 + 16 + 16] = np.int64(5).tobytes()  # document index 1 beyond the end
    refused(bytes(corrupt), "inconsistent document indices")
    corrupt = bytearray(good_idx)
    corrupt[34 + 8 + 8 : 34 + 8 + 16] = np.int64(4).tobytes()  # pointer of sequence 1 off
    refused(bytes(corrupt), "sequence pointers that do not follow its sequence lengths")


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(IndexedDatasetError, match="preprocess_data.py"):
        IndexedDataset(tmp_path / "none")
