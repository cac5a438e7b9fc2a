"""The index cache builds each index once, however many processes ask at once, and survives a
builder that dies while holding the lock."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from llm.data.index_cache import cached_index, index_key


def test_concurrent_requests_build_once_and_map_the_result(tmp_path: Path) -> None:
    calls: list[int] = []

    def build() -> tuple[np.ndarray, ...]:
        calls.append(1)
        time.sleep(0.3)  # long enough that every other thread arrives while it builds
        return np.arange(1000), np.arange(10) * 2

    results: list[tuple[np.ndarray, ...]] = []

    def ask() -> None:  # separate open() calls: flock excludes them as it excludes processes
        results.append(cached_index(tmp_path, "x", ("a", "b"), {"n": 1}, build, what="test index"))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    for a, b in results:
        np.testing.assert_array_equal(a, np.arange(1000))
        np.testing.assert_array_equal(b, np.arange(10) * 2)
        assert isinstance(a, np.memmap)
    key = index_key({"n": 1})
    assert (tmp_path / f"x.{key}.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_builder_killed_while_holding_the_lock_does_not_block_the_others(tmp_path: Path) -> None:
    lock = tmp_path / f"x.{index_key({'n': 2})}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        done: list[tuple[np.ndarray, ...]] = []
        t = threading.Thread(
            target=lambda: done.append(
                cached_index(tmp_path, "x", ("a",), {"n": 2}, lambda: (np.ones(3),), what="t")
            )
        )
        t.start()
        time.sleep(0.5)
        assert not done  # waiting for the holder
        holder.send_signal(signal.SIGKILL)
        t.join(timeout=30)
        assert done and done[0][0].tolist() == [1.0, 1.0, 1.0]
    finally:
        holder.kill()
        holder.wait()


def test_token_files_and_index_caches_are_readable_as_the_umask_allows(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    """A temporary file renamed into place keeps mkstemp's 0600: on a shared filesystem the rest of a
    team could not read the corpus. Files get what open() would give them: 0666 minus the umask."""
    import os
    import stat

    from llm.data.preprocess import preprocess
    from llm.data.sources import Record

    for umask, mode in ((0o022, 0o644), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            out = tmp_path / f"u{umask:o}" / "corpus"
            out.parent.mkdir()
            records = (Record("str", f"document {i} of the corpus", "test", i) for i in range(20))
            preprocess(records, tokenizer=str(tokenizer_path), output_prefix=out, workers=1, progress=False)
            cached_index(
                out.parent / "cache", "x", ("a",), {"n": umask}, lambda: (np.arange(5),), what="test index"
            )
        finally:
            os.umask(old)
        written = [out.with_suffix(".bin"), out.with_suffix(".idx"), *(out.parent / "cache").glob("x.*.npy")]
        assert len(written) == 3
        assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in written} == {
            f.name: oct(mode) for f in written
        }
