"""Weighted mixtures of datasets with exact proportions.

Sample i of the blend comes from the dataset whose share is furthest behind its target after i
samples (largest `weight_j * (i + 1) - count_j`, ties to the lowest index). This greedy rule keeps
every dataset within one sample of its exact share `weight_j * n` at every prefix length n, and is
deterministic. It is built by a compiled helper (`llm.data.native`; a Python loop where no C
compiler exists, same result) and cached like the GPT sample indices: by default beside the first
dataset's other indices, keyed by the weights and the sample count, the only things it depends on.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from llm.config import ConfigError
from llm.data.index_cache import cached_index
from llm.data.native import blend_library

logger = logging.getLogger(__name__)
BLEND_INDEX_VERSION = 1
PYTHON_WARNING_SAMPLES = 1_000_000


class SampleSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"blend weights {list(weights)} must be non-negative and not all zero")
    return w / w.sum()


def samples_per_dataset(weights: Sequence[float], num_samples: int) -> list[int]:
    """How many samples each dataset must provide for a blend of `num_samples`."""
    w = normalize_weights(weights)
    return [int(math.ceil(x * num_samples)) + 1 for x in w]


def _index_dtype(num_datasets: int) -> type[np.signedinteger]:
    return np.int16 if num_datasets < 32000 else np.int32


def _sample_dtype(num_samples: int) -> type[np.signedinteger]:
    return np.int32 if num_samples < 2**31 else np.int64


def blend_index_python(w: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference loop (normalized weights); `build_blend_index` uses the compiled one."""
    counts = np.zeros(len(w), dtype=np.int64)
    dataset_index = np.empty(num_samples, dtype=_index_dtype(len(w)))
    sample_index = np.empty(num_samples, dtype=_sample_dtype(num_samples))
    for i in range(num_samples):
        j = int(np.argmax(w * (i + 1) - counts))
        dataset_index[i] = j
        sample_index[i] = counts[j]
        counts[j] += 1
    return dataset_index, sample_index


def build_blend_index(
    weights: Sequence[float] | np.ndarray, num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index), each of length num_samples."""
    w = np.ascontiguousarray(normalize_weights(weights), dtype=np.float64)
    lib = blend_library()
    if lib is None:
        if num_samples >= PYTHON_WARNING_SAMPLES:
            logger.warning("building a blend index of %d samples in Python (about %.0f s)",
                           num_samples, 3.7e-6 * num_samples)  # fmt: skip
        return blend_index_python(w, num_samples)
    dataset_index = np.empty(num_samples, dtype=_index_dtype(len(w)))
    sample_index = np.empty(num_samples, dtype=_sample_dtype(num_samples))
    status = lib.llm_blend_index(
        w.ctypes.data_as(ctypes.c_void_p), len(w), num_samples,
        dataset_index.ctypes.data_as(ctypes.c_void_p), dataset_index.itemsize,
        sample_index.ctypes.data_as(ctypes.c_void_p), sample_index.itemsize,
    )  # fmt: skip
    if status:
        raise MemoryError("the blend index helper could not allocate its counters")
    return dataset_index, sample_index


def cached_blend_index(
    weights: np.ndarray, num_samples: int, cache_dir: str | Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """The blend index, from the cache in `cache_dir` (built and stored there when missing);
    None builds it in memory."""
    if cache_dir is None:
        return build_blend_index(weights, num_samples)
    w = normalize_weights(weights)
    desc = {"version": BLEND_INDEX_VERSION, "weights": w.tolist(), "num_samples": num_samples}
    di, si = cached_index(
        cache_dir, "blend", ("dataset_index", "sample_index"), desc,
        lambda: build_blend_index(w, num_samples), what=f"blend index of {num_samples} samples",
    )  # fmt: skip
    return di, si


class BlendedDataset:
    """`ds[i]` is a sample of dataset `dataset_index[i]`, its `sample_index[i]`-th."""

    def __init__(
        self,
        datasets: Sequence[SampleSource],
        weights: Sequence[float],
        num_samples: int,
        *,
        names: list[str] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError("one weight per dataset is needed")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.num_samples = num_samples
        labels = names or [str(i) for i in range(len(datasets))]
        self.dataset_index, self.sample_index = cached_blend_index(self.weights, num_samples, cache_dir)
        need = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for j, ds in enumerate(self.datasets):
            if need[j] > len(ds):
                raise ValueError(f"dataset {labels[j]} provides {len(ds)} samples, the blend needs {need[j]}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]
