from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    dtype_for_vocab,
)


def _write(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> None:
    b = IndexedDatasetBuilder(prefix, dtype=dtype)
    for d in docs:
        b.add_document(np.asarray(d))
    b.finalize()


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_writer_reader_round_trip(tmp_path: Path, dtype) -> None:
    rng = np.random.default_rng(0)
    hi = 60000 if dtype == np.uint16 else 100000
    docs = [rng.integers(0, hi, size=n).tolist() for n in (5, 1, 300, 0, 17)]
    _write(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.get(2, 10, 5).tolist() == docs[2][10:15]
    assert ds.doc_lengths.tolist() == [len(d) for d in docs]
    assert not ds[2].flags.writeable  # zero-copy read-only view of the mapping


def test_dtype_choice() -> None:
    assert dtype_for_vocab(65536) is np.uint16
    assert dtype_for_vocab(65537) is np.uint32


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

    binf.write_bytes(good_bin[:-2])
    with pytest.raises(IndexedDatasetError, match="d.bin.*truncated"):
        IndexedDataset(tmp_path / "d")
    binf.write_bytes(good_bin)

    idx.write_bytes(good_idx[:-8])
    with pytest.raises(IndexedDatasetError, match="truncated or corrupt"):
        IndexedDataset(tmp_path / "d")

    idx.write_bytes(b"XXXXXXXX" + good_idx[8:])
    with pytest.raises(IndexedDatasetError, match="bad magic"):
        IndexedDataset(tmp_path / "d")

    idx.write_bytes(good_idx[:10])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(tmp_path / "d")

    corrupt = bytearray(good_idx)
    corrupt[40:48] = np.int64(99).tobytes()  # offset of doc 1 beyond the end
    idx.write_bytes(bytes(corrupt))
    with pytest.raises(IndexedDatasetError, match="inconsistent document offsets"):
        IndexedDataset(tmp_path / "d")


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(IndexedDatasetError, match="preprocess_data.py"):
        IndexedDataset(tmp_path / "none")
