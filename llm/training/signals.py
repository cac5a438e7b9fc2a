"""Planned stops: SIGTERM / SIGUSR1 (what SLURM and most schedulers send before killing a job).

The handler only sets a flag; the trainer checks it at every iteration boundary, agrees with all
ranks (any rank signalled -> all stop), saves a checkpoint and returns, so the process exits 0.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
