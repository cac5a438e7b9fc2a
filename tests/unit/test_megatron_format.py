"""Our token files and Megatron-Core's are one format: each side reads what the other writes,
checked with Megatron-Core's own IndexedDataset and IndexedDatasetBuilder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llm.data.gpt_dataset import GPTDataset
from llm.data.indexed_dataset import IndexedDataset
from llm.data.preprocess import preprocess
from llm.data.sources import Record
from tests.conftest import TOKENIZER, megatron_core_indexed


def test_files_written_by_preprocess_open_in_megatron_core(tmp_path: Path) -> None:
    texts = ["The first document.", "A second, longer document with more words in it.", "Third!"] * 5
    records = (Record("str", t, "mem", i) for i, t in enumerate(texts, 1))
    preprocess(records, tokenizer=str(TOKENIZER), output_prefix=tmp_path / "ours", progress=False)
    ours = IndexedDataset(tmp_path / "ours")
    theirs = megatron_core_indexed().IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(ours) == len(texts)  # one sequence per document
    assert theirs.index.dtype == np.uint16
    assert theirs.document_indices.tolist() == list(range(len(texts) + 1))
    for i in range(len(texts)):
        assert theirs[i].tolist() == ours[i].tolist() and len(ours[i]) > 1


def test_files_written_by_megatron_core_read_here_with_their_documents(
    megatron_prefix: Path, builtin_prefix: Path
) -> None:
    theirs = megatron_core_indexed().IndexedDataset(str(megatron_prefix))
    ours = IndexedDataset(megatron_prefix)
    assert ours.dtype == np.int32 and ours.format == "megatron"
    # Megatron's documents are ours: the sentences of a document stay together, in order
    di = theirs.document_indices
    assert len(ours) == len(di) - 1 and len(theirs) > len(ours)  # several sequences per document
    for doc in range(0, len(ours), max(1, len(ours) // 50)):
        want = np.concatenate([theirs[s] for s in range(di[doc], di[doc + 1])])
        assert ours[doc].tolist() == want.tolist()
    # the same documents and tokens as the corpus they were copied from, so the same samples
    source = IndexedDataset(builtin_prefix)
    assert np.array_equal(ours.offsets, source.offsets)
    assert np.array_equal(np.asarray(ours.tokens), np.asarray(source.tokens, dtype=np.int32))
    kw = {"doc_range": (0, len(ours)), "seq_length": 64, "num_samples": 20, "seed": 3}
    a = GPTDataset(ours, cache_dir=None, **kw)
    b = GPTDataset(source, cache_dir=None, **kw)
    assert all(np.array_equal(a[i], b[i]) for i in range(20))


def test_megatron_builder_item_by_item_and_merged_indices(tmp_path: Path) -> None:
    mi = megatron_core_indexed()
    docs = [[[1, 2], [3]], [[4, 5, 6]], [], [[7], [8], [9, 10]]]  # documents of sentences (one empty)
    for part, chunk in (("a", docs[:2]), ("b", docs[2:])):
        b = mi.IndexedDatasetBuilder(str(tmp_path / f"{part}.bin"), dtype=np.uint16)
        for doc in chunk:
            for sentence in doc:
                b.add_item(torch.tensor(sentence))
            b.end_document()
        b.finalize(str(tmp_path / f"{part}.idx"))
    merged = mi.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)  # Megatron's merge tool path
    merged.add_index(str(tmp_path / "a"))
    merged.add_index(str(tmp_path / "b"))
    merged.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(tmp_path / "m")
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4, 5, 6], [], [7, 8, 9, 10]]
