"""The checkpoint writer (llm/checkpoint/writer.py): torch.save's bytes, hashed while written, and a
durable file flushed to disk behind the writer and dropped from the page cache as it goes (observed
with mincore, the system call fincore and vmtouch use)."""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llm.checkpoint import writer
from llm.checkpoint.format import file_checksum
from llm.checkpoint.pickles import load_file
from llm.engine.internals import storage_key

REPO = Path(__file__).resolve().parents[2]


def _state() -> dict:
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    return {"w": w, "view": w[5:9], "ids": torch.arange(7), "nested": {"lr": 0.5, "name": "adam", "n": [1, 2]}}


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "cached"])
def test_the_writer_writes_torch_saves_bytes_and_describes_them(tmp_path: Path, zipfile: bool, durable: bool) -> None:
    state, path = _state(), tmp_path / "mp_rank_00_model_states.pt"
    entry = writer.write(state, path, durable=durable, zipfile=zipfile)
    expected = io.BytesIO()  # torch.save to a file object: what the writer hands torch.save
    with writer.without_zip_crc32():
        torch.save(state, expected, _use_new_zipfile_serialization=zipfile)
    assert path.read_bytes() == expected.getvalue()
    if not zipfile:  # the legacy format (DeepSpeed's default) does not name the archive after the file
        with writer.without_zip_crc32():
            torch.save(state, tmp_path / "by_path.pt", _use_new_zipfile_serialization=False)
        assert path.read_bytes() == (tmp_path / "by_path.pt").read_bytes()
    assert entry["size"] == path.stat().st_size and entry["xxh3_64"] == file_checksum(path)
    loaded = load_file(path)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["view"], state["view"])
    assert loaded["view"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()  # still a view
    assert loaded["nested"] == state["nested"] and torch.equal(loaded["ids"], state["ids"])


def test_recorded_descriptions_are_taken_once_and_a_changed_file_is_left_to_be_hashed(tmp_path: Path) -> None:
    tag = tmp_path / "iter_0000010"
    (tag / "rng").mkdir(parents=True)
    writer.save({"a": torch.ones(3)}, tag / "model.pt", durable=True)
    writer.save({"b": torch.ones(4)}, tag / "rng" / "rank_00000.pt", durable=False)
    writer.save({"c": torch.ones(5)}, tmp_path / "elsewhere.pt", durable=False)
    with (tag / "rng" / "rank_00000.pt").open("ab") as f:  # changed after it was written
        f.write(b"x")
    taken = writer.take_recorded(tag)
    model = tag / "model.pt"
    assert taken == {"model.pt": {"size": model.stat().st_size, "xxh3_64": file_checksum(model), "flushed": True}}
    assert writer.take_recorded(tag) == {}
    assert list(writer.take_recorded(tmp_path)) == ["elsewhere.pt"]


def _disk_directory(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a directory in the checkout where tmp_path is on tmpfs (whose pages are memory:
    nothing to flush or drop)."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    best = max((m for m in mounts if str(tmp_path).startswith(m[1])), key=lambda m: len(m[1]))
    if best[2] not in ("tmpfs", "ramfs"):
        yield tmp_path
        return
    directory = REPO / "runs" / f"writer-test-{os.getpid()}"
    directory.mkdir(parents=True)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def _cached_bytes(path: Path) -> int:
    """How much of `path` is in the page cache (mincore over a mapping of the whole file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long)  # fmt: skip
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    size, page = path.stat().st_size, mmap.PAGESIZE
    with path.open("rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw) * page
        finally:
            libc.munmap(addr, size)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/mounts").exists(), reason="Linux")
def test_a_durable_file_is_flushed_behind_and_leaves_the_page_cache(tmp_path: Path) -> None:
    """A 200 MB durable file: on disk (the description is of the bytes written) and at most two parts
    (64 MB) of it ever cached at the end, in fact none; without durability the same file stays cached
    (the check sees the page cache)."""
    state = {f"t{i}": torch.randn(5_000_000) for i in range(10)}  # 200 MB in ten records
    for directory in _disk_directory(tmp_path):
        durable, cached = directory / "durable.pt", directory / "cached.pt"
        entry = writer.write(state, durable, durable=True)
        writer.write(state, cached, durable=False)
        assert entry["size"] > 200e6
        assert _cached_bytes(durable) == 0
        assert _cached_bytes(cached) > 100e6
        assert entry["xxh3_64"] == file_checksum(durable)  # read back from the disk
        assert torch.equal(load_file(durable)["t9"], state["t9"])


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/mounts").exists(), reason="Linux")
def test_while_a_durable_file_is_written_at_most_two_parts_of_it_are_cached(tmp_path: Path) -> None:
    """What keeps a save's memory traffic in the same few pages: while 256 MB are written in 8 MB
    writes, never more than two parts (2 x 32 MB) and the last write are cached; written without
    durability, everything is."""
    chunk = os.urandom(8 << 20)
    for directory in _disk_directory(tmp_path):
        for durable, bound in ((True, 2 * writer.PART + len(chunk) + mmap.PAGESIZE), (False, None)):
            path = directory / f"{durable}.bin"
            f = writer.StreamedFile(path, durable=durable)
            most = 0
            for _ in range(32):
                f.write(chunk)
                most = max(most, _cached_bytes(path))
            entry = f.close()
            assert entry["size"] == 32 * len(chunk) and entry["xxh3_64"] == file_checksum(path)
            if bound is not None:
                assert 0 < most <= bound
            else:
                assert most == entry["size"]


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_host_copy_is_written_as_the_device_tensor_it_copies(tmp_path: Path, zipfile: bool) -> None:
    """`locations`: an asynchronous save's host copy of a GPU tensor is recorded in the file as on
    that GPU (what torch.save of the original records), the other storages as they are, and only
    within that write."""
    state = _state()
    locations = {storage_key(state["w"].untyped_storage()): "cuda:0"}
    writer.write(state, tmp_path / "copy.pt", durable=False, zipfile=zipfile, locations=locations)
    writer.write(state, tmp_path / "after.pt", durable=False, zipfile=zipfile)
    for name, expected in (("copy.pt", ["cpu", "cuda:0"]), ("after.pt", ["cpu", "cpu"])):
        seen: list[str] = []

        def on_cpu(storage: torch.UntypedStorage, location: str, seen: list[str] = seen) -> torch.UntypedStorage:
            seen.append(location)
            return storage

        loaded = torch.load(tmp_path / name, map_location=on_cpu, weights_only=True)
        assert sorted(seen) == expected  # w's storage (with its view) and the ids' storage
        assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["view"], state["view"])
