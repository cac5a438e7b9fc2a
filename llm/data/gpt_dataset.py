"""GPT training samples: windows of `seq_length + 1` tokens running across document boundaries.

Three indices, as in Megatron-LM, define the samples of one dataset (a document range of one
token file):

- `doc_idx`: the documents of the range, shuffled once per epoch, epochs concatenated. Reading the
  documents in this order gives one long token stream.
- `sample_idx` (num_samples + 1, 2): sample k starts at stream position k * seq_length, stored as
  (position in doc_idx, offset inside that document); sample k ends one token past where sample
  k + 1 starts, so consecutive samples share one token (input of one = label of the previous).
- `shuffle_idx`: a permutation of the samples.

All three follow from (token file, document range, seq_length, num_samples, seed) alone. They are
built vectorized and cached on disk as .npy files named by a hash of those parameters, once per
node (`llm.data.index_cache`), and memory-mapped on load.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm.config import parse_split
from llm.data.index_cache import cached_index
from llm.data.indexed_dataset import IndexedDataset
from llm.errors import LLMError

logger = logging.getLogger(__name__)
INDEX_VERSION = 1


class DatasetTooSmallError(LLMError, ValueError):
    """The data cannot provide one sample; the message says how much it holds."""


def split_ranges(num_docs: int, split: str) -> list[tuple[int, int]]:
    """Contiguous document ranges for train/valid/test."""
    fractions = parse_split(split)
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_docs)))
    bounds[-1] = num_docs
    bounds = [min(b, num_docs) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


@dataclass(frozen=True)
class SampleIndex:
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray


def _fingerprint(data: IndexedDataset) -> str:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(data.offsets).tobytes())
    return h.hexdigest()[:16]


def build_sample_index(
    doc_lengths: np.ndarray, documents: np.ndarray, *, seq_length: int, num_samples: int, seed: int
) -> SampleIndex:
    """The three indices in memory (vectorized; O(epochs x documents + samples))."""
    rng = np.random.default_rng(seed)
    tokens_per_epoch = int(doc_lengths[documents].sum())
    if tokens_per_epoch < seq_length + 1:
        raise DatasetTooSmallError(
            f"the dataset has {tokens_per_epoch} tokens, fewer than one sample of seq_length + 1 = "
            f"{seq_length + 1}: use more data or a shorter model.seq_length"
        )
    needed = num_samples * seq_length + 1
    epochs = max(1, math.ceil(needed / tokens_per_epoch))
    doc_idx = np.concatenate([rng.permutation(documents) for _ in range(epochs)]).astype(np.int64)
    cum = np.zeros(len(doc_idx) + 1, dtype=np.int64)
    np.cumsum(doc_lengths[doc_idx], out=cum[1:])
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(cum, starts, side="right") - 1
    sample_idx = np.stack([pos, starts - cum[pos]], axis=1).astype(np.int64)
    shuffle_idx = rng.permutation(num_samples).astype(np.int64)
    return SampleIndex(doc_idx, sample_idx, shuffle_idx)


def cached_sample_index(
    data: IndexedDataset,
    documents: np.ndarray,
    *,
    seq_length: int,
    num_samples: int,
    seed: int,
    cache_dir: str | Path | None,
) -> SampleIndex:
    """Maps the indices from the cache, or builds them (once per node) and stores them there."""
    desc = {
        "version": INDEX_VERSION,
        "prefix": os.path.abspath(data.prefix),
        "fingerprint": _fingerprint(data),
        "documents": [int(documents[0]), int(documents[-1]), len(documents)] if len(documents) else [],
        "seq_length": seq_length,
        "num_samples": num_samples,
        "seed": seed,
    }
    directory = Path(cache_dir) if cache_dir else Path(data.prefix).parent / "index-cache"

    def build() -> tuple[np.ndarray, ...]:
        index = build_sample_index(
            data.doc_lengths, documents, seq_length=seq_length, num_samples=num_samples, seed=seed
        )
        return index.doc_idx, index.sample_idx, index.shuffle_idx

    arrays = cached_index(
        directory, Path(data.prefix).name, ("doc_idx", "sample_idx", "shuffle_idx"), desc, build,
        what=f"sample index of {data.prefix} ({num_samples} samples over {len(documents)} documents)",
    )  # fmt: skip
    return SampleIndex(*arrays)


class GPTDataset:
    """`ds[i]` -> int64 array of seq_length + 1 tokens (inputs are [:-1], labels [1:])."""

    def __init__(
        self,
        data: IndexedDataset,
        *,
        doc_range: tuple[int, int],
        seq_length: int,
        num_samples: int,
        seed: int,
        cache_dir: str | Path | None = None,
        name: str = "train",
    ) -> None:
        self.data = data
        self.seq_length = seq_length
        self.name = name
        documents = np.arange(doc_range[0], doc_range[1], dtype=np.int64)
        if len(documents) == 0:
            raise DatasetTooSmallError(
                f"the {name} split of '{data.prefix}' has no documents: adjust data.split or give "
                f"data.{name}_data_path"
            )
        self.num_samples = num_samples
        self.index = cached_sample_index(
            data, documents, seq_length=seq_length, num_samples=num_samples, seed=seed, cache_dir=cache_dir
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        k = int(self.index.shuffle_idx[i])
        doc_pos, offset = (int(x) for x in self.index.sample_idx[k])
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        filled = 0
        while filled < len(out):
            doc = int(self.index.doc_idx[doc_pos])
            piece = self.data.get(doc, offset, None)[: len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            doc_pos += 1
            offset = 0
        return out
