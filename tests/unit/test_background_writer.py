"""The background checkpoint writer (checkpoint.async_save) on its own: its process runs only on CPU
time that training leaves idle, and its host copy is made while training goes on (that its files
are a synchronous save's bytes is tests/integration/test_async_save.py's)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llm.checkpoint import writer
from llm.checkpoint.background import BackgroundSave, HostBuffers, WriterProcess, copy_storages
from llm.checkpoint.format import file_checksum
from llm.parallel.process_groups import ParallelContext


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_the_writer_process_writes_at_idle_priority(tmp_path: Path) -> None:
    state = {"w": torch.arange(12.0).view(3, 4), "step": 3}
    writer = WriterProcess()
    try:
        entry = writer.save(state, str(tmp_path / "state.pt"), zipfile=True, durable=True)
        assert os.sched_getscheduler(writer.process.pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, writer.process.pid) == 19
    finally:
        writer.process.kill()
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    # described as written (writer.write: hashed while written, flushed)
    path = tmp_path / "state.pt"
    assert (entry["size"], entry["xxh3_64"], entry["flushed"]) == (path.stat().st_size, file_checksum(path), True)


def test_the_host_copy_is_made_while_training_goes_on_and_the_update_waits_for_it(tmp_path: Path) -> None:
    """BackgroundSave.copy only lays the copy out; the writer thread fills it (after
    debug.checkpoint_copy_delay_seconds here: after the next forward and backward); before_update
    waits for it, and that wait is the save's blocking time.
    The copy holds the values at the save, views sharing one buffer as the originals share a storage."""
    w = torch.randn(1 << 20)
    at_save = w.clone()
    state = {"w": w, "view": w[3:7], "step": 5}
    background = BackgroundSave(ParallelContext.single(), copy_delay_seconds=1.0)
    copied, devices = background.copy(state)
    assert devices == {} and copied["view"].untyped_storage().data_ptr() == copied["w"].untyped_storage().data_ptr()
    seen: list[dict] = []
    background.start(lambda ctx: seen.append({k: v.clone() for k, v in copied.items() if k != "step"}), tmp_path)
    background.blocked(4, 0.01)
    assert background.take_block() is None  # the copy is not taken yet
    time.sleep(0.1)  # forward and backward
    background.before_update()
    w.add_(1.0)  # the optimizer step
    assert background.wait()
    assert torch.equal(seen[0]["w"], at_save) and torch.equal(seen[0]["view"], at_save[3:7])
    iteration, seconds = background.take_block()  # type: ignore[misc]
    assert iteration == 4 and 0.5 < seconds < 10.0  # the save call and the rest of the copy's delay
    assert background.take_block() is None


def test_the_writer_process_writes_a_host_copy_as_torch_save_writes_the_original(tmp_path: Path) -> None:
    """What ZeRO 3's files hold: empty tensors, each its own storage (a storage is told apart as
    torch.save does, not by its data pointer, which every empty one shares), and tensors with Python
    attributes (DeepSpeed's `ds_id` on the flat fp32 groups; torch.save writes them, and
    torch.multiprocessing's sharing drops them). In the zip format, which DeepSpeed writes here: the
    legacy format names each storage by its memory address, so no two saves of it are alike."""
    flat = torch.randn(100)
    flat.ds_id = "0_24"  # type: ignore[attr-defined]
    state = {"flat": [flat, flat[10:20]], "placeholders": [torch.empty(0), torch.empty(0)], "step": 3}
    background, process = BackgroundSave(ParallelContext.single()), WriterProcess()
    try:
        copied, devices = background.copy(state)
        background.start(lambda ctx: None, tmp_path)
        assert background.wait()
        process.save(copied, str(tmp_path / "async.pt"), zipfile=True, durable=False, devices=devices)
    finally:
        process.process.kill()
    writer.write(state, tmp_path / "sync.pt", durable=False, zipfile=True)
    assert (tmp_path / "async.pt").read_bytes() == (tmp_path / "sync.pt").read_bytes()


def test_the_host_copy_leaves_the_interpreter_to_the_training_thread() -> None:
    """copy_storages runs beside training: while it copies 256 MB, the training thread runs Python
    (here: wakes from 1 ms waits; a storage's copy_ would hold the interpreter lock for the whole
    copy, and the training thread would first run once the copy is done)."""
    source = torch.ones(256 << 20, dtype=torch.uint8).untyped_storage()
    buffer = HostBuffers().take(source)
    started, done = threading.Event(), threading.Event()

    def copy() -> None:
        started.set()
        copy_storages([(source, buffer)])
        done.set()

    thread = threading.Thread(target=copy)
    thread.start()
    started.wait()
    woke = 0
    while not done.wait(0.001):
        woke += 1
    thread.join()
    assert woke > 0 and bytes(buffer[-8:]) == b"\x01" * 8
