from __future__ import annotations

import numpy as np

from llm.data.blended import BlendedDataset, build_blend_index, samples_per_dataset


def test_every_prefix_is_within_one_sample_of_its_share() -> None:
    for weights in ([0.5, 0.3, 0.2], [0.91, 0.09], [1, 1, 1, 7], [0.333, 0.333, 0.334]):
        w = np.asarray(weights, dtype=float) / sum(weights)
        n = 20000
        di, si = build_blend_index(weights, n)
        onehot = np.zeros((n, len(w)))
        onehot[np.arange(n), di] = 1
        counts = onehot.cumsum(axis=0)  # counts[k] = samples of each dataset among the first k + 1
        targets = np.outer(np.arange(1, n + 1), w)
        assert np.abs(counts - targets).max() <= 1.0
        for j in range(len(w)):  # sample indices count up within each dataset
            np.testing.assert_array_equal(si[di == j], np.arange(int((di == j).sum())))


def test_blend_reads_the_right_samples_and_is_deterministic() -> None:
    a = [np.full(3, i) for i in range(100)]
    b = [np.full(3, 1000 + i) for i in range(100)]
    n = 60
    sizes = samples_per_dataset([2, 1], n)
    assert sizes == [41, 21]
    ds1 = BlendedDataset([a, b], [2, 1], n)
    ds2 = BlendedDataset([a, b], [2, 1], n)
    got = [int(ds1[i][0]) for i in range(n)]
    assert got == [int(ds2[i][0]) for i in range(n)]
    assert sum(x < 1000 for x in got) == 40
    assert [x for x in got if x < 1000] == list(range(40))
