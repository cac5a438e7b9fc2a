"""Checkpoint saves that do not stall training (`checkpoint.async_save`).

The step that saves writes the small files (meta, RNG streams, shard maps) and lets DeepSpeed run
its save as usual, except that its writer does not write. It lays out a host copy of each state
dict DeepSpeed hands it instead (llm.engine.internals.write_failures_kept(write=...)), in
shared-memory buffers reused from save to save, and returns. Training then goes on: a thread fills
the buffers while the next step's forward and backward run (they change none of the saved state;
on a GPU the copy is a DMA on a stream of its own), and the optimizer step waits until it is done
(`before_update`; torch.distributed.checkpoint's "async staging" works this way). The thread then
hands the copies to a writer process, which writes them as a synchronous save does (writer.write, with DeepSpeed's
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
import ctypes
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from llm.checkpoint import writer
from llm.engine.internals import storage_key
from llm.parallel.process_groups import ParallelContext


def host_copy(obj: Any, buffers: HostBuffers) -> tuple[Any, dict[int, str], list[tuple[Any, Any]]]:
    """A deep copy of a state dict whose every tensor lives in a host buffer, one per storage (views
    keep sharing it, as in the original, so torch.save writes the same bytes): the copy is
    independent of the training that goes on. `buffers`: shared-memory storages to copy into,
    reused from the last save where the sizes agree (allocating and first touching shared memory
    costs far more than the copy), extended where they do not; the copy can then go to the writer
    process without another copy.

    The bytes are not copied here: the third value lists the (source storage, host buffer) pairs
    that copy_storages fills, in the background (BackgroundSave.start), while the next step's
    forward and backward run; they change none of these storages, and the optimizer step waits for
    the copy (BackgroundSave.before_update). Also returns the devices the tensors were copied from
    where not the CPU ({index in _tensors' order: torch's location tag}): the writer records those,
    as torch.save of the original would."""
    storages: dict[int, Any] = {}
    pairs: list[tuple[Any, Any]] = []
    memo: dict[int, Any] = {}
    devices: dict[int, str] = {}
    tagged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, t in enumerate(_tensors(obj)):  # each tensor once
        storage = t.untyped_storage()
        key = storage_key(storage)  # as torch.save tells storages apart (empty ones too)
        if key not in storages:
            storages[key] = buffers.take(storage)
            pairs.append((storage, storages[key]))
        if storage.device.type != "cpu":
            devices[i] = torch.serialization.location_tag(storage)
        copied = torch.empty((), dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            copied = torch.nn.Parameter(copied, requires_grad=t.requires_grad)
        elif t.requires_grad:
            copied.requires_grad_(True)
        memo[id(t)] = copied
        if vars(t):
            tagged.append((t, copied))
    for t, copied in tagged:  # Python attributes (DeepSpeed's ds_id on ZeRO 3's flat groups): torch.save writes them
        vars(copied).update(copy.deepcopy(vars(t), memo))
    return copy.deepcopy(obj, memo), devices, pairs


def copy_storages(pairs: list[tuple[Any, Any]], after: dict[str, Any] | None = None) -> None:
    """Fills each host buffer from its source storage (host_copy's pairs), letting go of the interpreter
    lock (a storage's copy_ holds it: the training thread would stop for as long). A host source is one
    memmove, on this thread alone: a torch copy here would start an OpenMP team for this thread whose
    workers keep training's priority after the thread drops to idle (measured: the background write
    then took half the time, out of the steps it overlapped). GPU sources are copied on a stream of
    this thread's own (page-locked buffers: DMA on the copy engine, beside training's kernels) that
    first waits for `after` ({device: an event recorded on the training stream when the save was
    taken}, so every kernel that wrote the state before the save has run), then waits for the
    copies: the buffers hold the state on return."""
    streams: dict[str, Any] = {}
    for source, buffer in pairs:
        if not source.nbytes():
            continue
        if source.device.type != "cuda":
            ctypes.memmove(buffer.data_ptr(), source.data_ptr(), source.nbytes())
            continue
        src = torch.empty(0, dtype=torch.uint8, device=source.device).set_(source)
        dst = torch.empty(0, dtype=torch.uint8).set_(buffer)
        device = str(source.device)
        if device not in streams:
            streams[device] = torch.cuda.Stream(device=source.device)
            if after is not None and device in after:
                streams[device].wait_event(after[device])
        with torch.cuda.stream(streams[device]):
            dst.copy_(src, non_blocking=True)
    for stream in streams.values():
        stream.synchronize()


def training_stream_events(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """{device: an event on its current (training) stream, recorded now} for each GPU of `pairs`'
    sources: what copy_storages waits for before it reads them."""
    devices = {str(source.device) for source, _ in pairs if source.device.type == "cuda"}
    return {device: torch.cuda.current_stream(torch.device(device)).record_event() for device in devices}


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

    def take(self, storage: Any) -> Any:
        """The next buffer, of `storage`'s size (page-locked for a GPU source); copy_storages fills it."""
        i, self.used = self.used, self.used + 1
        if i >= len(self.storages) or self.storages[i].nbytes() != storage.nbytes():
            fresh = torch.empty(storage.nbytes(), dtype=torch.uint8).share_memory_().untyped_storage()
            if i < len(self.storages):
                self._unpin(self.storages[i])
            self.storages[i : i + 1] = [fresh]
        if storage.device.type == "cuda":
            self._pin(self.storages[i])
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


def _tensors(obj: Any, seen: set[int] | None = None, *, attributes: bool = True) -> list[torch.Tensor]:
    """Every tensor in `obj`, once, in a fixed order; with `attributes`, also those among a tensor's
    Python attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    values: Any
    if isinstance(obj, torch.Tensor):
        values = vars(obj).values() if attributes else ()
    elif isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        values = vars(obj).values()
    else:
        return []
    found = [t for v in values for t in _tensors(v, seen, attributes=attributes)]
    return [obj, *found] if isinstance(obj, torch.Tensor) else found


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
        # a tensor's Python attributes do not survive torch.multiprocessing's sharing: sent beside it
        attributes = {i: vars(t) for i, t in enumerate(_tensors(state, attributes=False)) if vars(t)}
        self.requests.put((path, state, attributes, zipfile, durable, devices or {}))
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
        path, state, attributes, zipfile, durable, devices = item
        try:  # as the training process's saves write (the same bytes), hashed while written
            if attributes:
                for i, t in enumerate(_tensors(state, attributes=False)):
                    vars(t).update(attributes.get(i, {}))
            locations = {}
            if devices:  # copies of GPU tensors
                tensors = _tensors(state)
                locations = {storage_key(tensors[i].untyped_storage()): device for i, device in devices.items()}
            replies.put(("ok", writer.write(state, path, durable=durable, zipfile=zipfile, locations=locations)))
        except (OSError, RuntimeError) as e:
            replies.put(("error", getattr(e, "errno", None), getattr(e, "strerror", None) or str(e)))
        del state, item


class BackgroundSave:
    """The one checkpoint save that may be in flight, and what it left: its error, its seconds, and
    how long training waited for it (the save call and any wait for the host copy)."""

    def __init__(self, ctx: ParallelContext, *, delay_seconds: float = 0.0, copy_delay_seconds: float = 0.0) -> None:
        self.ctx, self.delay, self.copy_delay = ctx, delay_seconds, copy_delay_seconds
        self._background_ctx: ParallelContext | None = None
        self.buffers = HostBuffers()
        self._writer: WriterProcess | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.tag_dir: Any = None
        self.seconds: float | None = None
        self._pairs: list[tuple[Any, Any]] = []  # the copies the save being taken still has to make
        self._copied = threading.Event()  # set while no host copy is pending
        self._copied.set()
        self._copy_error: BaseException | None = None
        self._block: tuple[int, float] | None = None  # (iteration, seconds training waited) of the save in flight

    def start(self, work: Callable[[ParallelContext], None], tag_dir: Any) -> None:
        """Starts the writer thread: it fills the host buffers of this save's copies (copy_storages),
        then runs `work(background_ctx)`. Called by every rank at the same save."""
        if self._background_ctx is None:  # a collective: every rank creates it at its first async save
            self._background_ctx = self.ctx.for_background()
        ctx = self._background_ctx
        self.tag_dir, self.error, self.seconds = tag_dir, None, None
        pairs, self._pairs = self._pairs, []
        after = training_stream_events(pairs)  # now, on the training thread's streams
        self._copied.clear()
        self._copy_error = None

        def run() -> None:
            start = time.perf_counter()
            try:  # at training's priority: the optimizer step waits for it
                if self.copy_delay:  # debug.checkpoint_copy_delay_seconds: after the next forward and backward
                    time.sleep(self.copy_delay)
                copy_storages(pairs, after)
            except BaseException as e:  # noqa: BLE001 (the write step below reports it on every rank)
                self._copy_error = e
            finally:
                pairs.clear()  # the sources (GPU memory) are training's again
                self._copied.set()
            run_when_idle(threading.get_native_id())  # this thread hashes and waits for the writer
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
        """host_copy of one state dict of the save being taken, into the reused buffers; the bytes are
        copied once the save starts (start)."""
        copied, devices, pairs = host_copy(state, self.buffers)
        self._pairs.extend(pairs)
        return copied, devices

    def before_update(self) -> None:
        """Called by the training thread before anything changes the saved state (the optimizer step):
        waits until the host copy of the save in flight is taken. The forward and backward passes
        before it ran while the copy was made; the wait counts as the save's blocking time."""
        if self._copied.is_set():
            return
        start = time.perf_counter()
        self._copied.wait()
        if self._block is not None:
            self._block = (self._block[0], self._block[1] + time.perf_counter() - start)

    def blocked(self, iteration: int, seconds: float) -> None:
        """The save at `iteration` kept training waiting `seconds` (the save call, and the wait for the
        save before it)."""
        self._block = (iteration, seconds)

    def take_block(self) -> tuple[int, float] | None:
        """Once its host copy is taken: the save's iteration and all the time training waited for it
        (the save call and before_update); once."""
        if self._block is None or not self._copied.is_set():
            return None
        block, self._block = self._block, None
        return block

    def write(self, captured: list[tuple[str, Any, dict[int, str]]], *, zipfile: bool, durable: bool) -> None:
        """Writes the captured state dicts through the writer process (started on first use) and
        records each file's description for the MANIFEST step (writer.record)."""
        if self._copy_error is not None:
            raise RuntimeError(f"the host copy of the state failed: {self._copy_error}")
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
        self._pairs = []  # nor copies laid out by a save that failed before it started
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return True
