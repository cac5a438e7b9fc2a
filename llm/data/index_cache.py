"""On-disk cache of the sample indices (GPT windows, shuffles, blends), built once per node.

An index is a few numpy arrays determined by a small description (token file fingerprint,
document range, sequence length, sample count, seed, weights, format version). They are stored as
`.npy` files named by a hash of that description, with the description beside them as JSON, and
memory-mapped on load, so a billion-sample index costs no memory and no time on a warm start.

The first process that needs a missing index takes an exclusive lock file beside it (`flock`) and
builds it; every other rank of the node (and of other nodes, on a shared filesystem whose locks
work) waits for the lock, then maps the finished files. A builder that dies releases its lock and
the next process builds. Where no lock can be taken (a read-only or lock-less filesystem) each
process builds the index in memory; files are always written under a unique temporary name and
renamed into place, so concurrent writers never expose a partial file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llm.data.files import temporary_file

logger = logging.getLogger(__name__)
WAIT_NOTICE_S = 5.0


def index_key(desc: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = temporary_file(path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(paths: list[Path]) -> tuple[np.ndarray, ...] | None:
    if not all(p.is_file() for p in paths):
        return None
    try:
        return tuple(np.load(p, mmap_mode="r") for p in paths)
    except (ValueError, OSError):
        logger.warning("index cache %s is unreadable; rebuilding it", paths[0].parent)
        return None


def _lock(path: Path, what: str) -> Any | None:
    """An open file holding an exclusive flock on `path`, or None where locks do not work."""
    try:
        f = open(path, "a+")  # noqa: SIM115 (closed by the caller)
    except OSError:
        return None
    start = time.monotonic()
    noticed = False
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if not noticed and time.monotonic() - start > WAIT_NOTICE_S:
                logger.info("waiting for another process that is building the %s (%s)", what, path.parent)
                noticed = True
            time.sleep(0.05)
        except OSError:
            f.close()
            return None


def cached_index(
    directory: str | Path,
    stem: str,
    names: tuple[str, ...],
    desc: dict[str, Any],
    build: Callable[[], tuple[np.ndarray, ...]],
    *,
    what: str,
) -> tuple[np.ndarray, ...]:
    """The arrays `names` of the index described by `desc`: mapped from the cache, or built by
    `build()` (once per node: see the module doc) and stored there."""
    directory = Path(directory)
    key = index_key(desc)
    paths = [directory / f"{stem}.{key}.{n}.npy" for n in names]
    found = _load(paths)
    if found is not None:
        return found
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.warning("cannot create the index cache %s (%s); building the %s in memory", directory, e, what)
        return build()
    lock = _lock(directory / f"{stem}.{key}.lock", what)
    try:
        found = _load(paths)  # built by the process that held the lock before us
        if found is not None:
            return found
        start = time.perf_counter()
        arrays = build()
        logger.info("built the %s in %.1f s (cached in %s)", what, time.perf_counter() - start, directory)
        try:
            (directory / f"{stem}.{key}.json").write_text(json.dumps(desc, indent=1))
            for p, arr in zip(paths, arrays):
                _save_atomic(p, arr)
        except OSError as e:
            logger.warning(
                "cannot write the index cache in %s (%s); using the %s from memory", directory, e, what
            )
            return arrays
        return _load(paths) or arrays
    finally:
        if lock is not None:
            lock.close()
