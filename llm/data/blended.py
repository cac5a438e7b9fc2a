"""Weighted mixtures of datasets with exact proportions.

Sample i of the blend comes from the dataset whose share is furthest behind its target after i
samples (largest `weight_j * (i + 1) - count_j`, ties to the lowest index). This greedy rule keeps
every dataset within one sample of its exact share `weight_j * n` at every prefix length n, and is
deterministic. The choice arrays are cached like the GPT sample indices.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from llm.config import ConfigError


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


def build_blend_index(
    weights: Sequence[float] | np.ndarray, num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index), each of length num_samples."""
    w = normalize_weights(weights)
    counts = np.zeros(len(w), dtype=np.int64)
    dataset_index = np.empty(num_samples, dtype=np.int16 if len(w) < 32000 else np.int32)
    sample_index = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        j = int(np.argmax(w * (i + 1) - counts))
        dataset_index[i] = j
        sample_index[i] = counts[j]
        counts[j] += 1
    return dataset_index, sample_index


def _cached_blend_index(
    weights: np.ndarray, num_samples: int, names: list[str], cache_dir: str | Path | None
) -> tuple[np.ndarray, np.ndarray]:
    if cache_dir is None:
        return build_blend_index(weights, num_samples)
    desc = json.dumps({"weights": weights.tolist(), "n": num_samples, "names": names}, sort_keys=True)
    key = hashlib.sha1(desc.encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"blend.{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["dataset_index"], z["sample_index"]
    di, si = build_blend_index(weights, num_samples)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{hashlib.sha1(str(id(di)).encode()).hexdigest()[:8]}.tmp.npz")
        np.savez(tmp, dataset_index=di, sample_index=si)
        tmp.replace(path)
    except OSError:
        pass
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
        self.dataset_index, self.sample_index = _cached_blend_index(
            self.weights, num_samples, labels, cache_dir
        )
        for j, ds in enumerate(self.datasets):
            need = int(np.sum(self.dataset_index == j))
            if need > len(ds):
                raise ValueError(f"dataset {labels[j]} provides {len(ds)} samples, the blend needs {need}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]
