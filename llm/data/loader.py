"""Datasets from the data config, and the sharded, resumable batch order.

Global order: step s trains on global samples [s x G, (s + 1) x G) of the (already shuffled)
dataset, G = global batch size. Data-parallel rank r takes the r-th contiguous slice of G / dp
samples and cuts it into micro-batches. The set of samples of every step, and so the whole
training sequence, depends only on G and `consumed_samples`, never on the data-parallel size or
the micro-batch size: a run resumed at another layout continues the same sequence with no sample
repeated or skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm.config import DataConfig
from llm.data.blended import BlendedDataset, samples_per_dataset
from llm.data.gpt_dataset import DatasetTooSmallError, GPTDataset, split_ranges
from llm.data.indexed_dataset import IndexedDataset, IndexedDatasetError, missing_token_file
from llm.errors import LLMError


class DataConfigError(LLMError, ValueError):
    """A data path setting that cannot be used; the message names it."""


def parse_data_path(value: str | list[Any] | None, key: str) -> list[tuple[float, str]]:
    """'PREFIX' | 'w1 p1 w2 p2' | [w1, p1, w2, p2] -> [(weight, prefix), ...]."""
    if value is None:
        return []
    items = value.split() if isinstance(value, str) else [str(v) for v in value]
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise DataConfigError(f"{key} must be one prefix or alternate weight and prefix: got {value!r}")
    pairs = []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            pairs.append((float(w), p))
        except ValueError:
            raise DataConfigError(
                f"{key}: '{w}' is not a weight (expected weight, prefix, weight, prefix, ...)"
            ) from None
    return pairs


@dataclass(frozen=True)
class SplitSizes:
    train: int
    valid: int
    test: int


def _one_dataset(
    prefix: str, split: int | None, cfg: DataConfig, *, seq_length: int, n: int, seed: int
) -> GPTDataset:
    data = IndexedDataset(prefix, random_access=True)
    names = ("train", "valid", "test")
    doc_range = (0, len(data)) if split is None else split_ranges(len(data), cfg.split)[split]
    return GPTDataset(
        data,
        doc_range=doc_range,
        seq_length=seq_length,
        num_samples=n,
        seed=seed,
        cache_dir=cfg.index_cache_dir,
        name=names[split or 0],
    )


def _mixture(
    pairs: list[tuple[float, str]], split: int | None, cfg: DataConfig, *, seq_length: int, n: int, seed: int
) -> GPTDataset | BlendedDataset:
    if len(pairs) == 1:
        return _one_dataset(pairs[0][1], split, cfg, seq_length=seq_length, n=n, seed=seed)
    weights = [w for w, _ in pairs]
    counts = samples_per_dataset(weights, n)
    parts = [
        _one_dataset(p, split, cfg, seq_length=seq_length, n=c, seed=seed + j)
        for j, ((_, p), c) in enumerate(zip(pairs, counts))
    ]
    cache_dir = cfg.index_cache_dir or Path(pairs[0][1]).parent / "index-cache"
    return BlendedDataset(parts, weights, n, names=[p for _, p in pairs], cache_dir=cache_dir)


def check_token_files(cfg: DataConfig) -> None:
    """IndexedDatasetError for the first missing token file of data.train/valid/test_data_path: a
    check of seconds that runs before the model is built (a wrong path found at once, not after a
    large model's construction)."""
    for key in ("train_data_path", "valid_data_path", "test_data_path"):
        for _, prefix in parse_data_path(getattr(cfg, key), f"data.{key}"):
            missing = missing_token_file(prefix)
            if missing is not None:
                raise IndexedDatasetError(missing)


def build_datasets(
    cfg: DataConfig, *, seq_length: int, sizes: SplitSizes, seed: int
) -> tuple[Any, Any | None, Any | None]:
    """(train, valid, test); valid/test are None when they get no data or no samples are asked."""
    train_pairs = parse_data_path(cfg.train_data_path, "data.train_data_path")
    if not train_pairs:
        raise DataConfigError(
            "data.train_data_path is not set: point it at a PREFIX made by preprocess_data.py"
        )
    separate = cfg.valid_data_path is not None or cfg.test_data_path is not None
    kw = {"seq_length": seq_length, "seed": seed}
    train = _mixture(train_pairs, None if separate else 0, cfg, n=sizes.train, **kw)
    out: list[Any | None] = []
    for split, (path, n) in enumerate(
        [(cfg.valid_data_path, sizes.valid), (cfg.test_data_path, sizes.test)], 1
    ):
        pairs = (
            parse_data_path(path, f"data.{('valid', 'test')[split - 1]}_data_path")
            if separate
            else train_pairs
        )
        if n == 0 or not pairs:
            out.append(None)
            continue
        try:
            out.append(_mixture(pairs, None if separate else split, cfg, n=n, **kw))
        except DatasetTooSmallError:
            if separate:
                raise
            out.append(None)  # the split ratio gives this split no documents
    return train, out[0], out[1]


class ContinuedDataset:
    """`first`, then `more()` (built only when a sample beyond `first` is asked for): training data
    that can outlast its planned size. A run that skips batches after a loss-spike rollback needs
    that many samples more than train_iters x global batch; they come from `more()`, the same data
    drawn again with another seed, so the samples of `first` keep their order and positions."""

    def __init__(self, first: Any, more: Callable[[], Any]) -> None:
        self.first = first
        self._more_fn = more
        self._more: Any = None

    def __len__(self) -> int:
        return len(self.first) + (len(self._more) if self._more is not None else len(self.first))

    @property
    def datasets(self) -> list[Any]:
        return list(getattr(self.first, "datasets", [self.first]))

    def __getitem__(self, i: int) -> Any:
        if i < len(self.first):
            return self.first[i]
        if self._more is None:
            self._more = self._more_fn()
        return self._more[i - len(self.first)]


class GlobalBatchSampler:
    """Yields this rank's micro-batches (lists of sample indices), step after step. Each global batch
    is split into equal contiguous slices, one per data-parallel rank. `batch_sizes(k)`: the global
    batch of the k-th step from the start (a batch-size ramp-up); default `global_batch_size`."""

    def __init__(
        self,
        *,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        batch_sizes: Callable[[int], int] | None = None,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch size must be a multiple of micro batch x data-parallel size")
        self.total = total_samples
        self.consumed = consumed_samples
        self.micro = micro_batch_size
        self.rank = dp_rank
        self.dp_size = dp_size
        self.sizes = batch_sizes or (lambda k: global_batch_size)

    def _steps(self) -> Iterator[tuple[int, int]]:
        """(first sample, global batch) of every step that fits."""
        start, k = self.consumed, 0
        while start + (size := self.sizes(k)) <= self.total:
            yield start, size
            start, k = start + size, k + 1

    def __iter__(self) -> Iterator[list[int]]:
        for start, size in self._steps():
            per_rank = size // self.dp_size
            base = start + self.rank * per_rank
            for m in range(0, per_rank, self.micro):
                yield list(range(base + m, base + m + self.micro))

    def __len__(self) -> int:
        return sum(size // self.dp_size // self.micro for _, size in self._steps())


def collate(samples: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(samples).astype(np.int64))  # (B, S + 1)


def make_loader(
    dataset: Any, sampler: GlobalBatchSampler, *, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    # A private generator: creating the loader's iterator must not draw from the global torch RNG
    # (dropout's), or a resumed run would see other masks than an uninterrupted one. On a GPU the
    # batches come in pinned memory, so that the trainer's non-blocking copy to the device is
    # asynchronous (from pageable memory it makes the host wait).
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
