"""Planned stops: SIGTERM / SIGUSR1 (what SLURM and most schedulers send before killing a job) and
SIGINT (Ctrl-C).

The handler only sets a flag; the trainer checks it at every iteration boundary, agrees with all
ranks (any rank signalled -> all stop), saves a checkpoint and returns, so the process exits 0.
A second SIGINT raises KeyboardInterrupt at once (the entry script exits 130 without a traceback;
a save it interrupts never becomes `latest`).

A launcher that dies is a stop request too. DeepSpeed's `deepspeed` runner forwards no SIGTERM on a
single node (it dies at once, DeepSpeed issue #4098), leaving its per-node `deepspeed.launcher.launch`
process and every worker running on their own; a SIGKILLed torchrun agent does the same. So a worker
whose parent is such a launcher watches it (and, under DeepSpeed, the runner above it) once a second;
when one is gone, the worker stops as on SIGTERM: it ends the step, saves, and exits 0, and the
per-node launcher exits after it. A worker under a shell or `nohup` watches nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
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
        # The first reason is the one reported (a launcher follows a Ctrl-C with its own SIGTERM).
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


LAUNCHER_GONE = "launcher exited"
_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun", "torch.distributed.launch")


def _proc(pid: int, what: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/{what}").read_text(errors="replace")
    except OSError:
        return None


def _parent_of(pid: int) -> int | None:
    stat = _proc(pid, "stat")  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else None


def launcher_chain() -> list[tuple[int, int]]:
    """(pid, its parent pid now) for each process to watch: this worker's launcher, and under
    DeepSpeed the runner above it; empty when the parent is no known launcher (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    parent = os.getppid()
    cmdline = (_proc(parent, "cmdline") or "").replace("\0", " ")
    if not any(name in cmdline for name in _LAUNCHERS):
        return []
    chain: list[tuple[int, int]] = [(os.getpid(), parent)]
    if "deepspeed.launcher.launch" in cmdline:
        grand = _parent_of(parent)
        if grand is not None and grand > 1:
            chain.append((parent, grand))
    return chain


class LauncherWatch:
    """Sets `stop.signal_name = LAUNCHER_GONE` when a process of `launcher_chain()` changes parent
    (its parent died, it was re-parented) or disappears."""

    def __init__(self, stop: StopRequest, interval: float = 1.0) -> None:
        self.stop, self.interval = stop, interval
        self.chain = launcher_chain()

    def start(self) -> None:
        if self.chain:
            threading.Thread(target=self._run, name="llm-launcher-watch", daemon=True).start()

    def _gone(self) -> bool:
        return any(
            (os.getppid() if pid == os.getpid() else _parent_of(pid)) != parent for pid, parent in self.chain
        )

    def _run(self) -> None:
        while not self.stop.requested:
            if self._gone():
                self.stop.signal_name = LAUNCHER_GONE
                return
            time.sleep(self.interval)


def listen_for_stop() -> StopRequest:
    """The stop request an entry point trains with: the signal handlers installed (main thread) and
    the launcher watch started. The first SIGINT, SIGTERM or SIGUSR1 is a request honoured at the next
    iteration boundary (one arriving during the setup ends the run before its first step); a second
    SIGINT stops at once."""
    stop = StopRequest()
    stop.install()
    LauncherWatch(stop).start()
    return stop
