from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llm.config import DataConfig
from llm.data.blended import BlendedDataset
from llm.data.gpt_dataset import DatasetTooSmallError, GPTDataset
from llm.data.indexed_dataset import IndexedDatasetBuilder, IndexedDatasetError
from llm.data.loader import SplitSizes, build_datasets


def _prefix(path: Path, n_docs: int, base: int) -> str:
    b = IndexedDatasetBuilder(path, dtype=np.uint16)
    for i in range(n_docs):
        b.add_document(np.full(20, base + i % 100))
    b.finalize()
    return str(path)


def test_split_by_ratio_gives_disjoint_document_ranges(tmp_path: Path) -> None:
    p = _prefix(tmp_path / "a", 100, 0)
    cfg = DataConfig(train_data_path=p, split="80,10,10", index_cache_dir=str(tmp_path / "c"))
    train, valid, test = build_datasets(cfg, seq_length=8, sizes=SplitSizes(50, 10, 10), seed=1)
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and isinstance(test, GPTDataset)
    assert (len(train), len(valid), len(test)) == (50, 10, 10)
    docs = [set(np.asarray(d.index.doc_idx).tolist()) for d in (train, valid, test)]
    assert docs[0] <= set(range(80)) and docs[1] <= set(range(80, 90)) and docs[2] <= set(range(90, 100))


def test_empty_test_split_is_none(tmp_path: Path) -> None:
    p = _prefix(tmp_path / "a", 100, 0)
    cfg = DataConfig(train_data_path=p, split="95,5,0", index_cache_dir=str(tmp_path / "c"))
    _, valid, test = build_datasets(cfg, seq_length=8, sizes=SplitSizes(10, 5, 5), seed=1)
    assert valid is not None and test is None


def test_separate_prefixes_and_blends(tmp_path: Path) -> None:
    a, b = _prefix(tmp_path / "a", 50, 0), _prefix(tmp_path / "b", 50, 1000)
    v = _prefix(tmp_path / "v", 10, 2000)
    cfg = DataConfig(
        train_data_path=[0.75, a, 0.25, b], valid_data_path=v, index_cache_dir=str(tmp_path / "c")
    )
    train, valid, test = build_datasets(cfg, seq_length=8, sizes=SplitSizes(400, 20, 20), seed=3)
    assert isinstance(train, BlendedDataset) and test is None
    from_a = sum(int(train[i][0]) < 1000 for i in range(400))
    assert from_a == 300
    assert all(int(valid[i][0]) >= 2000 for i in range(20))
    # with separate prefixes the train data is used whole (all documents of a)
    assert set(np.asarray(train.datasets[0].index.doc_idx).tolist()) == set(range(50))


def test_missing_or_empty_data_is_clear(tmp_path: Path) -> None:
    with pytest.raises(IndexedDatasetError, match="preprocess_data.py"):
        build_datasets(
            DataConfig(train_data_path=str(tmp_path / "none")),
            seq_length=8,
            sizes=SplitSizes(1, 0, 0),
            seed=0,
        )
    v = _prefix(tmp_path / "v", 1, 0)
    cfg = DataConfig(train_data_path=v, valid_data_path=v, index_cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetTooSmallError, match="fewer than one sample"):
        build_datasets(cfg, seq_length=64, sizes=SplitSizes(1, 1, 0), seed=0)
