"""Checkpoint saves that do not stall training (`checkpoint.async_save`).

The step that saves writes the small files (meta, RNG streams, shard maps) and lets DeepSpeed run
its save as usual, except that its writer does not write. It takes a host copy of each state dict
DeepSpeed hands it instead (llm.engine.internals.write_failures_kept(write=...)), into
shared-memory buffers reused from save to save. Training then goes on. A thread hands the copies to
a writer process, which writes them as a synchronous save does (writer.write, with DeepSpeed's
serialization setting: the same bytes, hashed while written). The thread then hashes this rank's
share of the files nobody hashed while writing, agrees with every rank's thread, and on rank 0
writes MANIFEST, moves `latest` and prunes: the same steps, in the same order, as a synchronous
save. The thread's collectives run on a gloo group of their own (`ParallelContext.for_background`),
so they never interleave with training's.

Safety is a synchronous save's:
- `latest` moves only after every rank wrote and hashed;
- a process killed during the write leaves a directory without MANIFEST, which resume skips;
- a failure on any rank is agreed by every rank's thread, and the trainer's next step boundary
  raises it on every rank (one line; the partial directory removed).

At most one save is in flight: the next save, the end of training, a planned stop and a rollback
wait for it. The host copy is one checkpoint's shard per rank, freed once written.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from llm.checkpoint import writer
from llm.parallel.process_groups import ParallelContext


def host_copy(obj: Any, buffers: HostBuffers) -> tuple[Any, dict[int, str]]:
    """A deep copy of a state dict with every tensor's storage copied to the host, once per storage
    (views keep sharing it, as in the original, so torch.save writes the same bytes): the copy is
    independent of the training that goes on. `buffers`: shared-memory storages to copy into,
    reused from the last save where the sizes agree (allocating and first touching shared memory
    costs far more than the copy), extended where they do not; the copy can then go to the writer
    process without another copy. Also returns the devices the tensors were copied from where not
    the CPU ({index in _tensors' order: torch's location tag}): the writer records those, as
    torch.save of the original would."""
    storages: dict[tuple[str, int], Any] = {}
    memo: dict[int, Any] = {}
    devices: dict[int, str] = {}
    for i, t in enumerate(_tensors(obj)):  # each tensor once
        storage = t.untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        if key not in storages:
            storages[key] = buffers.copy(storage)
        if storage.device.type != "cpu":
            devices[i] = torch.serialization.location_tag(storage)
        copied = torch.empty((), dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            copied = torch.nn.Parameter(copied, requires_grad=t.requires_grad)
        elif t.requires_grad:
            copied.requires_grad_(True)
        memo[id(t)] = copied
    if any(device.startswith("cuda") for device in devices.values()):
        torch.cuda.synchronize()  # the device-to-host copies were asynchronous: done before the write reads them
    return copy.deepcopy(obj, memo), devices


class HostBuffers:
    """Shared-memory storages that one save's host copies go into, in the order the save meets its
    tensors' storages; the next save reuses each where the size agrees (the same model: all of them).
    A buffer that receives a GPU tensor is page-locked for the device (cudaHostRegister, as
    torch.distributed.checkpoint's stager pins its shared memory), so the copy is a DMA transfer at
    the link's speed instead of one staged through the driver's pageable bounce buffer; where the
    driver refuses, the copy goes to pageable memory as before."""

    def __init__(self) -> None:
        self.storages: list[Any] = []
        self.used = 0
        self.pinned: set[int] = set()  # data pointers of the page-locked buffers

    def rewind(self) -> None:
        self.used = 0

    def copy(self, storage: Any) -> Any:
        i, self.used = self.used, self.used + 1
        if i >= len(self.storages) or self.storages[i].nbytes() != storage.nbytes():
            fresh = torch.empty(storage.nbytes(), dtype=torch.uint8).share_memory_().untyped_storage()
            if i < len(self.storages):
                self._unpin(self.storages[i])
            self.storages[i : i + 1] = [fresh]
        on_gpu = storage.device.type == "cuda"
        if on_gpu:
            self._pin(self.storages[i])
        self.storages[i].copy_(storage, non_blocking=on_gpu)  # host_copy synchronizes once at its end
        return self.storages[i]

    def _pin(self, buffer: Any) -> None:
        ptr = buffer.data_ptr()
        if ptr in self.pinned or not buffer.nbytes():
            return
        if int(torch.cuda.cudart().cudaHostRegister(ptr, buffer.nbytes(), 1)) == 0:  # 1: portable
            self.pinned.add(ptr)

    def _unpin(self, buffer: Any) -> None:
        ptr = buffer.data_ptr()
        if ptr in self.pinned:
            self.pinned.discard(ptr)
            torch.cuda.cudart().cudaHostUnregister(ptr)


def _tensors(obj: Any, seen: set[int] | None = None) -> list[torch.Tensor]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [t for v in vars(obj).values() for t in _tensors(v, seen)]
    return []


def run_when_idle(tid: int) -> None:
    """Lets thread `tid` (0: the caller) run only on CPU time training leaves idle: Linux's SCHED_IDLE
    policy, and nice 19 where that is missing (Linux keeps both per thread). The background write has
    until the next save, which waits for it, so it cannot starve for longer. An optimisation, never a
    reason to fail a save: where neither call works, the thread keeps its priority."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


class WriterProcess:
    """A process that writes state dicts (writer.write: torch.save). A thread of the training process
    would hold the interpreter lock for most of a write (torch.save does), stalling the training
    thread for as long (measured: a 4 s write made the step it overlapped 5x slower); the process
    shares only the host copies' memory. It does not receive the launcher's stop signals (a planned stop's last save
    must complete) and leaves when the training process is gone."""

    def __init__(self) -> None:
        mp = torch.multiprocessing.get_context("spawn")
        self.requests, self.replies = mp.Queue(), mp.Queue()
        self.process = mp.Process(target=_writer_main, args=(self.requests, self.replies, os.getpid()),
                                  name="llm-checkpoint-writer", daemon=True)  # fmt: skip
        self.process.start()

    def save(
        self, state: Any, path: str, *, zipfile: bool, durable: bool, devices: dict[int, str] | None = None
    ) -> dict[str, Any]:
        """Writes `state` to `path` as writer.write does; the file's description. `devices`: {index
        of a tensor in the state (in _tensors' order): the device it was copied from}, where not the
        CPU (host_copy)."""
        self.requests.put((path, state, zipfile, durable, devices or {}))
        while True:
            try:
                reply = self.replies.get(timeout=5.0)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the checkpoint writer process died (exit code {self.process.exitcode})") from None
        if reply[0] == "error":
            _, errno, text = reply
            raise OSError(errno, text) if errno else RuntimeError(text)
        return dict(reply[1])


def _writer_main(requests: Any, replies: Any, parent: int) -> None:
    # A process group of its own: a launcher's SIGTERM or a terminal's Ctrl-C to the training
    # processes does not reach it (a planned stop's last save must complete); the training process's
    # exit stops it (multiprocessing terminates daemonic children).
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_when_idle(0)  # training's threads first: the write has until the next save
    while True:
        try:
            item = requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the training process is gone
                return
            continue
        path, state, zipfile, durable, devices = item
        try:  # as the training process's saves write (the same bytes), hashed while written
            tensors = _tensors(state)
            locations = {tensors[i].untyped_storage().data_ptr(): device for i, device in devices.items()}
            replies.put(("ok", writer.write(state, path, durable=durable, zipfile=zipfile, locations=locations)))
        except (OSError, RuntimeError) as e:
            replies.put(("error", getattr(e, "errno", None), getattr(e, "strerror", None) or str(e)))
        del state, item


class BackgroundSave:
    """The one checkpoint save that may be in flight, and what it left: its error, its seconds."""

    def __init__(self, ctx: ParallelContext, *, delay_seconds: float = 0.0) -> None:
        self.ctx, self.delay = ctx, delay_seconds
        self._background_ctx: ParallelContext | None = None
        self.buffers = HostBuffers()
        self._writer: WriterProcess | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.tag_dir: Any = None
        self.seconds: float | None = None

    def start(self, work: Callable[[ParallelContext], None], tag_dir: Any) -> None:
        """Runs `work(background_ctx)` in the writer thread. Called by every rank at the same save."""
        if self._background_ctx is None:  # a collective: every rank creates it at its first async save
            self._background_ctx = self.ctx.for_background()
        ctx = self._background_ctx
        self.tag_dir, self.error, self.seconds = tag_dir, None, None

        def run() -> None:
            run_when_idle(threading.get_native_id())  # this thread hashes and waits for the writer
            start = time.perf_counter()
            try:
                if self.delay:  # debug.checkpoint_write_delay_seconds: a slow disk, for fault tests
                    time.sleep(self.delay)
                work(ctx)
            except BaseException as e:  # noqa: BLE001 (raised in the training thread by wait())
                self.error = e
            self.seconds = time.perf_counter() - start

        self._thread = threading.Thread(target=run, name="llm-checkpoint-writer", daemon=True)
        self._thread.start()

    def copy(self, state: Any) -> tuple[Any, dict[int, str]]:
        """host_copy of one state dict of the save being captured, into the reused buffers."""
        return host_copy(state, self.buffers)

    def write(self, captured: list[tuple[str, Any, dict[int, str]]], *, zipfile: bool, durable: bool) -> None:
        """Writes the captured state dicts through the writer process (started on first use) and
        records each file's description for the MANIFEST step (writer.record)."""
        if self._writer is None:
            self._writer = WriterProcess()
        for path, state, devices in captured:
            writer.record(path, self._writer.save(state, path, zipfile=zipfile, durable=durable, devices=devices))

    @property
    def failed(self) -> bool:
        """This rank's writer finished with an error (every rank's does: they agree on it)."""
        return self._thread is not None and not self._thread.is_alive() and self.error is not None

    def finished(self) -> bool:
        """A save finished successfully since the last call (its tag_dir and seconds are set)."""
        if self._thread is None or self._thread.is_alive() or self.error is not None:
            return False
        self._thread = None
        return True

    def wait(self) -> bool:
        """Until the save in flight is done; raises its error. True when there was one."""
        self.buffers.rewind()  # no save in flight after this: the next one may reuse every buffer
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return True
