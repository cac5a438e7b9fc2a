"""Progress of long commands: a tqdm bar on a terminal, else one log line (logger `llm.progress`,
INFO) every `interval` seconds with the count, rate and ETA, so logs of batch jobs stay readable.
Only the process that reports (rank 0) creates an enabled one."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

logger = logging.getLogger("llm.progress")


def show_progress_lines() -> None:
    """For entry scripts that set up no logging of their own: progress lines to stderr."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int | None, desc: str, *, unit: str = "it", enabled: bool = True,
                 interval: float = 30.0) -> None:  # fmt: skip
        self.total, self.desc, self.unit, self.enabled, self.interval = total, desc, unit, enabled, interval
        self.done = 0
        self.start = self.last = time.monotonic()
        self.lines = 0
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        if final:
            tail = f"done in {format_duration(elapsed)}"
        elif self.total and rate > 0:
            tail = f"eta {format_duration((self.total - self.done) / rate)}"
        else:
            tail = f"{format_duration(elapsed)} so far"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        logger.info(
            "%s: %s%s %s, %s %s/s, %s", self.desc, count, pct, self.unit, f"{rate:,.1f}", self.unit, tail
        )
        self.lines += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.lines:  # a summary only where periodic lines were printed
            self._line(time.monotonic(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
