"""Peak memory of this process, measured the same way on GPU and CPU.

GPU: `torch.cuda.max_memory_allocated` since the last reset (what the caching allocator handed to
tensors). CPU: anonymous memory at its peak, from /proc/self/status: the resident-set high-water
mark VmHWM, less the file-backed pages resident now (shared libraries, memory-mapped token files),
less the anonymous memory at the reset that is not tensors (the interpreter, imported modules:
DeepSpeed's first `initialize` alone imports ~100 MB of them). Writing "5" to /proc/self/clear_refs
lowers VmHWM to the current RSS, so a peak during import or setup does not count. glibc returns a freed block to the system only when it was mmap-backed; its adaptive
threshold keeps many freed multi-MB tensors in the heap, so RSS can exceed live tensor memory by
20-30% in training; MALLOC_MMAP_THRESHOLD_=65536 in the environment makes it follow closely.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """`reset()` once setup is done; `peak_bytes()` afterwards (None where unmeasurable)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.baseline = 0
        self.resettable = False

    def reset(self) -> None:
        """From now on; tensors alive now (model, optimizer state) stay counted."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.baseline = 0
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        anon = ((_status_kb("RssAnon") or 0) + (_status_kb("RssShmem") or 0)) * 1024
        self.baseline = anon - live_tensor_bytes()

    def peak_bytes(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        hwm, files = _status_kb("VmHWM"), _status_kb("RssFile")
        if hwm is None or files is None or not self.resettable:
            return None
        return max((hwm - files) * 1024 - self.baseline, 0)


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of every tensor Python can reach now."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            # type() rather than isinstance(): the latter trips deprecation shims of some modules
            if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):  # sparse, freed weakrefs and such
            continue
    return sum(storages.values())
