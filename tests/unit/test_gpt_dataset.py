from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from llm.data.gpt_dataset import DatasetTooSmallError, GPTDataset, build_sample_index, split_ranges
from llm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def _tokens_file(path: Path, lengths: list[int]) -> IndexedDataset:
    b = IndexedDatasetBuilder(path, dtype=np.uint16)
    start = 0
    for n in lengths:
        b.add_document(np.arange(start, start + n) % 60000)
        start += n
    b.finalize()
    return IndexedDataset(path)


def _stream_of(data: IndexedDataset, doc_idx: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(data[int(d)]) for d in doc_idx])


def test_samples_are_the_windows_of_the_shuffled_stream_across_epochs(tmp_path: Path) -> None:
    data = _tokens_file(tmp_path / "d", [7, 1, 30, 4, 12])  # 54 tokens per epoch
    seq = 10
    ds = GPTDataset(data, doc_range=(0, 5), seq_length=seq, num_samples=20, seed=3, cache_dir=tmp_path / "c")
    stream = _stream_of(data, np.asarray(ds.index.doc_idx))
    assert len(ds.index.doc_idx) == 5 * 4  # 20 samples x 10 tokens + 1 need 4 epochs of 54
    for epoch in range(4):  # every epoch is a permutation of all documents
        assert sorted(ds.index.doc_idx[epoch * 5 : (epoch + 1) * 5]) == [0, 1, 2, 3, 4]
    seen = set()
    for i in range(len(ds)):
        k = int(ds.index.shuffle_idx[i])
        seen.add(k)
        sample = ds[i]
        assert sample.shape == (seq + 1,)
        np.testing.assert_array_equal(sample, stream[k * seq : k * seq + seq + 1])
    assert seen == set(range(20))


def test_index_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    lengths = np.asarray([5, 9, 3, 20, 8, 13])
    docs = np.arange(6)
    a = build_sample_index(lengths, docs, seq_length=4, num_samples=30, seed=1)
    b = build_sample_index(lengths, docs, seq_length=4, num_samples=30, seed=1)
    c = build_sample_index(lengths, docs, seq_length=4, num_samples=30, seed=2)
    for x, y in zip((a.doc_idx, a.sample_idx, a.shuffle_idx), (b.doc_idx, b.sample_idx, b.shuffle_idx)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)


def test_no_sample_reads_past_the_data(tmp_path: Path) -> None:
    data = _tokens_file(tmp_path / "d", [3, 3, 3, 2])  # 11 tokens: exactly 2 samples of 5 + 1
    ds = GPTDataset(data, doc_range=(0, 4), seq_length=5, num_samples=2, seed=0, cache_dir=tmp_path / "c")
    assert len(ds.index.doc_idx) == 4  # one epoch suffices
    for i in range(2):
        assert len(ds[i]) == 6
    with pytest.raises(IndexError):
        ds[2]


def test_too_small_and_empty_splits_are_clear(tmp_path: Path) -> None:
    data = _tokens_file(tmp_path / "d", [3, 2])
    with pytest.raises(DatasetTooSmallError, match="fewer than one sample"):
        GPTDataset(data, doc_range=(0, 2), seq_length=8, num_samples=1, seed=0, cache_dir=tmp_path)
    with pytest.raises(DatasetTooSmallError, match="no documents"):
        GPTDataset(
            data, doc_range=(1, 1), seq_length=2, num_samples=1, seed=0, cache_dir=tmp_path, name="valid"
        )


def test_split_ranges() -> None:
    assert split_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, "8,2") == [(0, 8), (8, 10), (10, 10)]
    with pytest.raises(ValueError):
        split_ranges(10, "a,b")


def test_cache_is_reused_and_keyed_by_parameters(tmp_path: Path) -> None:
    data = _tokens_file(tmp_path / "d", [50] * 10)
    kw = dict(doc_range=(0, 10), seq_length=16, num_samples=40, cache_dir=tmp_path / "c")
    a = GPTDataset(data, seed=1, **kw)
    files = sorted((tmp_path / "c").glob("*.npy"))
    assert len(files) == 3
    b = GPTDataset(data, seed=1, **kw)
    assert isinstance(b.index.doc_idx, np.memmap)  # loaded from the cache
    np.testing.assert_array_equal(a[5], b[5])
    GPTDataset(data, seed=2, **kw)
    assert len(list((tmp_path / "c").glob("*.npy"))) == 6


def _build_in_process(args: tuple[str, str]) -> list[int]:
    prefix, cache = args
    ds = GPTDataset(
        IndexedDataset(prefix), doc_range=(0, 200), seq_length=32, num_samples=5000, seed=7, cache_dir=cache
    )
    return [int(x) for x in ds[123]]


def test_concurrent_builders_are_safe(tmp_path: Path) -> None:
    _tokens_file(tmp_path / "d", list(range(5, 205)))
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_build_in_process, [(str(tmp_path / "d"), str(tmp_path / "c"))] * 4)
    assert all(r == results[0] for r in results)
    assert not list((tmp_path / "c").glob("*.tmp"))
    assert _build_in_process((str(tmp_path / "d"), str(tmp_path / "c"))) == results[0]
