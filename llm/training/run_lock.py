"""One run per directory: a lock file in the run directory (and the checkpoint directory when it
lies elsewhere), taken by rank 0 before anything is written there.

The lock is made NFS-safe without flock (which NFS does not honour everywhere): the holder's
description (host, pid, job, start time) is written to a private file, which is then hard-linked
to `.llm.lock`; link() is atomic on local filesystems and NFS alike and fails when the lock exists.
A lock whose holder is gone is taken over with a warning: a dead process on this host, or the same
job (SLURM_JOB_ID / TORCHELASTIC_RUN_ID: a requeued or restarted job). A lock held by a live process,
or from another host and job, is refused with one line naming the holder, unless
checkpoint.break_lock=true.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from llm.errors import LLMError

logger = logging.getLogger("llm")
LOCK = ".llm.lock"


class RunLockedError(LLMError, RuntimeError):
    """Another run holds this run's directory."""


def _me() -> dict[str, Any]:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": job,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


class RunLock:
    def __init__(self, directories: list[Path], *, force: bool) -> None:
        self.paths = [d / LOCK for d in dict.fromkeys(Path(x).resolve() for x in directories)]
        self.force = force
        self.me = _me()
        self.held: list[Path] = []

    def acquire(self) -> None:
        try:
            for path in self.paths:
                self._take(path)
                self.held.append(path)
        except BaseException:
            self.release()
            raise

    def _take(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = path.with_name(f"{LOCK}.{self.me['host']}.{self.me['pid']}")
        mine.write_text(json.dumps(self.me))
        try:
            for _ in range(3):
                try:
                    os.link(mine, path)
                    return
                except FileExistsError:
                    holder = self._holder(path)
                    if holder is None:
                        continue  # released while we looked: try again
                    self._take_over_or_refuse(path, holder)
            raise RunLockedError(f"cannot take the lock '{path}'; remove it if no run uses this directory")
        finally:
            mine.unlink(missing_ok=True)

    @staticmethod
    def _holder(path: Path) -> dict[str, Any] | None:
        try:
            return dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": "? (unreadable lock file)"}

    def _take_over_or_refuse(self, path: Path, holder: dict[str, Any]) -> None:
        same_host = holder.get("host") == self.me["host"]
        dead = same_host and not _alive(int(holder.get("pid", -1)))
        same_job = holder.get("job") is not None and holder.get("job") == self.me["job"]
        if not (dead or same_job or self.force):
            hint = "" if same_host else " (or checkpoint.break_lock=true if that host's run is gone)"
            raise RunLockedError(
                f"'{path.parent}' is in use by another run ({_describe(holder)}): stop it, or use another "
                f"logging.dir / checkpoint.dir{hint}"
            )
        why = (
            "its process is gone"
            if dead
            else "the same job restarted"
            if same_job
            else "checkpoint.break_lock"
        )
        logger.warning("taking over the lock of '%s' from %s: %s", path.parent, _describe(holder), why)
        path.unlink(missing_ok=True)

    def release(self) -> None:
        for path in self.held:
            holder = self._holder(path)
            if (
                holder is not None
                and holder.get("pid") == self.me["pid"]
                and holder.get("host") == self.me["host"]
            ):
                path.unlink(missing_ok=True)
        self.held = []
