"""Planned stops: SIGTERM / SIGUSR1 (what SLURM and most schedulers send before killing a job) and
SIGINT (Ctrl-C).

The handler only sets a flag; the trainer checks it at every iteration boundary, agrees with all
ranks (any rank signalled -> all stop), saves a checkpoint and returns, so the process exits 0.
A second SIGINT raises KeyboardInterrupt at once (the entry script exits 130 without a traceback;
a save it interrupts never becomes `latest`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
