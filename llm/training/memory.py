"""Peak memory of this process, for the `peak_memory_gb` metric.

GPU: `torch.cuda.max_memory_allocated` since the last reset (what the caching allocator handed to
tensors). CPU: the peak of anonymous resident memory since the last reset, from /proc/self/status:
the resident-set high-water mark VmHWM less the file-backed pages resident now (shared libraries,
memory-mapped token files). Writing "5" to /proc/self/clear_refs lowers VmHWM to the current RSS, so
a peak during import or setup does not count. On CPU this includes the interpreter and the
libraries' own memory (a few hundred MB with DeepSpeed); `baseline_bytes` is what a subclass may
leave out (benchmarks/plan_memory.py leaves out everything that is not a tensor at the reset, to
compare with the planner's estimate).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def status_kb(key: str) -> int | None:
    """One `key: N kB` line of /proc/self/status (None where there is no such file or line)."""
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

    def baseline_bytes(self) -> int:
        """Bytes present at the reset that the CPU peak leaves out (none here)."""
        return 0

    def reset(self) -> None:
        """From now on; tensors alive now (model, optimizer state) stay counted."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.baseline = self.baseline_bytes()

    def peak_bytes(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        hwm, files = status_kb("VmHWM"), status_kb("RssFile")
        if hwm is None or files is None or not self.resettable:
            return None
        return max((hwm - files) * 1024 - self.baseline, 0)
