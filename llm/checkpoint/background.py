"""Checkpoint saves that do not stall training (`checkpoint.async_save`).

The step that saves writes the small files (meta, RNG streams, shard maps) and lets DeepSpeed run
its save as usual, except that its writer does not write. It takes a host copy of each state dict
DeepSpeed hands it instead (llm.engine.internals.write_failures_kept(capture=...)). Training then
goes on. A thread writes those files with DeepSpeed's own writer, so they are the same bytes as a
synchronous save's. It then hashes this rank's share, agrees with every rank's thread, and on rank 0
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

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from llm.parallel.context import ParallelContext


def host_copy(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor's storage copied to the host, once per storage
    (views keep sharing it, as in the original, so torch.save writes the same bytes): the copy is
    independent of the training that goes on. Device storages go to pinned host memory."""
    storages: dict[tuple[str, int], Any] = {}
    memo: dict[int, Any] = {}
    on_device = False
    for t in _tensors(obj):
        if id(t) in memo:
            continue
        storage = t.untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        if key not in storages:
            if storage.device.type == "cpu":
                storages[key] = storage.clone()
            else:
                host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                host.untyped_storage().copy_(storage, non_blocking=True)
                storages[key], on_device = host.untyped_storage(), True
        copied = torch.empty((), dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            copied = torch.nn.Parameter(copied, requires_grad=t.requires_grad)
        elif t.requires_grad:
            copied.requires_grad_(True)
        memo[id(t)] = copied
    if on_device:
        torch.cuda.synchronize()
    return copy.deepcopy(obj, memo)


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


class BackgroundSave:
    """The one checkpoint save that may be in flight, and what it left: its error, its seconds."""

    def __init__(self, ctx: ParallelContext, *, delay_seconds: float = 0.0) -> None:
        self.ctx, self.delay = ctx, delay_seconds
        self._background_ctx: ParallelContext | None = None
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

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return True
