"""How every torch file of a checkpoint is written (`save`): hashed while it is written, and, when
the save must reach the disk (`checkpoint.fsync`), flushed to disk behind the writer and dropped from
the page cache as it goes.

- **Hashed while written.** torch.save writes its file front to back through `StreamedFile.write`,
  which feeds the same bytes to xxh3-64 (MANIFEST's checksum). The save's description of the file
  (size and checksum) is recorded here (`record`), and the MANIFEST step takes it (`take_recorded`)
  instead of reading the file back. A file changed after it was recorded (its size, inode or
  modification time differ) is read and hashed again.
- **Flushed behind** (durable saves only, Linux): every 32 MB written starts the disk write of that
  part (sync_file_range), waits for the part before it and drops it from the page cache
  (posix_fadvise DONTNEED), so a file of any size holds at most two parts of dirty and cached pages.
  The bytes must reach the disk before a durable save completes anyway; written this way the disk
  starts on them at once instead of at the final fsync, a checkpoint of 100 GB does not push the
  node's useful page cache (the dataset's) out, and the memory the writes pass through is the same
  64 MB over and over. On a virtual machine whose memory is backed on first touch (this project's
  CPU machine) that last point is most of a save's time: 1 GB of tensors saved, hashed and fsynced
  in 1.7-2.9 s through fresh page cache, 0.89 s written behind; a training run's synchronous save of
  1.4 GB in 0.8-0.86 s instead of 2.7-3.0 s (benchmarks/checkpoint_io.py; docs/benchmarks.md,
  "Checkpoint writes").
  Without `checkpoint.fsync` the file is written through the page cache as before (the save returns
  before the disk has the bytes; flushing behind would make it wait for them).

- **Without the zip format's CRC-32** (`without_zip_crc32`): torch.save leaves out the CRC-32 of each
  record. torch.load never checks it (a flipped byte loads silently), MANIFEST's xxh3-64 of every
  file is what verification and resume check, and computing it was most of torch.save's time (1 GB
  of tensors saved at 0.7 GB/s with it, 1.9 GB/s without, on this project's CPU machine;
  benchmarks/checkpoint_io.py, docs/benchmarks.md).

The bytes are torch.save's to a file object (a test compares them, both serialization formats): in
the legacy format (DeepSpeed's default) the same as to a path; in the zip format the archive's inner
folder is named `archive/` instead of after the file. An asynchronous save's writer process writes
its host copies of GPU tensors as saved from the GPU (`locations`): the synchronous save's bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.utils.serialization import config as serialization_config

from llm.checkpoint.format import CHECKSUM
from llm.engine.internals import storage_key

PART = 32 << 20  # bytes between two flushes behind the writer
_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_WAIT_FOR_WRITE = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER


def without_zip_crc32() -> contextlib.AbstractContextManager[Any]:
    """Within: torch.save writes each zip record's CRC-32 as 0 instead of computing it (torch's
    process-wide setting, restored on exit; MANIFEST's checksums cover every byte instead). Every
    torch file of a checkpoint is written within (`write`, in any process), so a synchronous and an
    asynchronous save write the same bytes."""
    return serialization_config.patch({"save.compute_crc32": False})  # type: ignore[attr-defined]  # added at import by torch


def _sync_file_range() -> Any:
    """glibc's sync_file_range (Python's os module has no binding), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_range = _sync_file_range() if hasattr(os, "posix_fadvise") else None


class StreamedFile:
    """A write-only file for torch.save: hashes what it writes, and with `durable` flushes it to disk
    behind the writer. It has no fileno() on purpose: torch.save then writes everything through
    write() (with a file descriptor its legacy format would write tensors straight to it, unhashed)."""

    def __init__(self, path: str | Path, *, durable: bool) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        self.hash = xxhash.xxh3_64()
        self.size = 0
        self.behind = durable and _sync_range is not None
        self.started = 0  # bytes whose write to disk was started
        self.dropped = 0  # bytes written to disk and dropped from the page cache
        self.durable = durable

    def write(self, data: Any) -> int:
        with memoryview(data) as view, view.cast("B") as b:
            for start in range(0, len(b), PART):  # a large tensor's record flushed behind in parts too
                part = b[start : start + PART]
                self.hash.update(part)
                done = 0
                while done < len(part):
                    done += os.write(self.fd, part[done:])
                self.size += done
                if self.behind and self.size - self.started >= PART:
                    self._flush_behind()
            return len(b)

    def flush(self) -> None:
        pass  # nothing buffered here: write() hands every byte to the kernel

    def _flush_behind(self) -> None:
        """Starts the disk write of what was written since the last call, then waits for the write
        of the part before it and drops that part from the page cache."""
        begin = self.started
        try:
            self._sync(begin, self.size - begin, _SYNC_FILE_RANGE_WRITE)
            if begin > self.dropped:
                self._sync(self.dropped, begin - self.dropped, _WAIT_FOR_WRITE)
                # from the page the last drop had to leave (it held bytes of this part, not yet written)
                first = self.dropped - self.dropped % mmap.PAGESIZE
                os.posix_fadvise(self.fd, first, begin - first, os.POSIX_FADV_DONTNEED)
                self.dropped = begin
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP):
                raise
            self.behind = False  # a file system without it: the final fsync writes everything
        self.started = self.size

    def _sync(self, offset: int, length: int, flags: int) -> None:
        assert _sync_range is not None  # self.behind
        if _sync_range(self.fd, offset, length, flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def close(self) -> dict[str, Any]:
        """Closes the file (flushed to disk first when durable); its description for MANIFEST."""
        try:
            if self.durable:
                os.fsync(self.fd)
                if self.behind:
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # all of it is on disk now
            st = os.fstat(self.fd)
        finally:
            os.close(self.fd)
        return {"size": self.size, CHECKSUM: self.hash.hexdigest(), "flushed": self.durable, "stat": _identity(st)}

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def write(
    obj: Any, path: str | Path, *, durable: bool, zipfile: bool = True, locations: dict[int, str] | None = None
) -> dict[str, Any]:
    """torch.save(obj, path) as a checkpoint writes it: without the zip format's CRC-32, hashed while
    written, flushed behind when `durable`. Returns the file's description (see `record`).
    `locations`: storages (by internals.storage_key) to record as saved from another device than their own:
    an asynchronous save's host copy of a GPU tensor is written as that GPU tensor (torch.save
    records each storage's device), so the file is the synchronous save's, byte for byte."""
    f = StreamedFile(path, durable=durable)
    try:
        with without_zip_crc32(), _saved_as_from(locations or {}):
            torch.save(obj, f, _use_new_zipfile_serialization=zipfile)  # type: ignore[arg-type]
    except BaseException:
        f.abandon()
        raise
    return f.close()


_saved_from: dict[int, str] = {}  # while writing: storage_key of a host copy -> the device it was copied from
_tagger_registered = False


def _location_of_copy(storage: Any) -> str | None:
    """torch.save's location tagger for the storages in _saved_from (None: torch's own taggers decide)."""
    return _saved_from.get(storage_key(storage)) if _saved_from else None


@contextlib.contextmanager
def _saved_as_from(locations: dict[int, str]) -> Any:
    global _tagger_registered
    if not locations:
        yield
        return
    if not _tagger_registered:  # ahead of torch's CPU tagger (priority 10); loading is not affected
        torch.serialization.register_package(5, _location_of_copy, lambda storage, location: None)
        _tagger_registered = True
    _saved_from.update(locations)
    try:
        yield
    finally:
        _saved_from.clear()


def save(obj: Any, path: str | Path, *, durable: bool, zipfile: bool = True) -> None:
    """`write`, and the file's description recorded for the MANIFEST step."""
    record(path, write(obj, path, durable=durable, zipfile=zipfile))


_recorded: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()


def record(path: str | Path, entry: dict[str, Any]) -> None:
    """Keeps a written file's description (from save, or from the background writer process's reply)."""
    with _lock:
        _recorded[os.path.abspath(path)] = entry


def take_recorded(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """The descriptions recorded for files under `tag_dir` ({relative name: {"size", "xxh3_64",
    "flushed"}}: "flushed", written durably), forgotten here; a file whose size, inode or
    modification time changed since is left out (the caller hashes it from disk)."""
    root = os.path.abspath(tag_dir) + os.sep
    with _lock:
        mine = {p: _recorded.pop(p) for p in [p for p in _recorded if p.startswith(root)]}
    found = {}
    for p, entry in mine.items():
        try:
            same = _identity(os.stat(p)) == tuple(entry["stat"])
        except OSError:
            same = False
        if same:
            found[p[len(root):]] = {k: entry[k] for k in ("size", CHECKSUM, "flushed")}
    return found


def for_manifest(recorded: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """take_recorded's descriptions as MANIFEST lists them ({"size", "xxh3_64"})."""
    return {name: {"size": entry["size"], CHECKSUM: entry[CHECKSUM]} for name, entry in recorded.items()}
