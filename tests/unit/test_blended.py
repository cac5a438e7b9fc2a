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


def test_compiled_index_equals_the_python_loop() -> None:
    from llm.data.blended import blend_index_python, normalize_weights
    from llm.data.native import blend_library

    assert blend_library() is not None  # this machine has a C compiler: the compiled path runs
    rng = np.random.default_rng(0)
    cases = [
        [0.5, 0.3, 0.2],
        [1, 1, 1],
        [1, 0, 2],
        [0.1] * 7 + [0.3],
        [1 / 3, 1 / 3, 1 / 3],
        list(rng.random(40)),
    ]
    for weights in cases:  # ties (equal weights) must go to the lowest index in both
        di, si = build_blend_index(weights, 30011)
        rdi, rsi = blend_index_python(normalize_weights(weights), 30011)
        assert di.dtype == rdi.dtype and si.dtype == rsi.dtype
        np.testing.assert_array_equal(di, rdi)
        np.testing.assert_array_equal(si, rsi)


def test_without_a_compiler_the_python_loop_gives_the_same_index(monkeypatch, caplog) -> None:
    from llm.data import native

    ref = build_blend_index([0.6, 0.4], 5000)
    monkeypatch.setenv("LLM_NATIVE_CACHE", "/nonexistent-cache-dir")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.blend_library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            got = build_blend_index([0.6, 0.4], 5000)
        assert "no C compiler ('/nonexistent/cc') found" in caplog.text
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    finally:
        native.blend_library.cache_clear()


def test_blend_index_is_cached_and_mapped(tmp_path) -> None:
    a = [np.full(3, i) for i in range(100)]
    b = [np.full(3, 1000 + i) for i in range(100)]
    first = BlendedDataset([a, b], [2, 1], 60, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".dataset_index.npy") for f in files) and any(f.endswith(".json") for f in files)
    again = BlendedDataset([b, a], [4, 2], 60, cache_dir=tmp_path)  # same normalized weights: same file
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    assert isinstance(again.dataset_index, np.memmap)
    np.testing.assert_array_equal(first.dataset_index, again.dataset_index)
