"""The run-directory lock and the choice of checkpoint to resume, in-process on real files."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm.checkpoint.format import choose_checkpoint, write_manifest, write_meta
from llm.training.run_lock import LOCK, RunLock, RunLockedError


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_one_run_per_directory(tmp_path: Path) -> None:
    first = RunLock([tmp_path / "run", tmp_path / "ckpt"], force=False)
    first.acquire()
    holder = json.loads((tmp_path / "run" / LOCK).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] > 0
    with pytest.raises(RunLockedError, match=r"is in use by another run \(pid \d+ on "):
        RunLock([tmp_path / "run"], force=False).acquire()  # a live holder (this very process)
    first.release()
    assert not (tmp_path / "run" / LOCK).exists() and not (tmp_path / "ckpt" / LOCK).exists()


def test_stale_and_foreign_locks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "earlier"}))
    taker = RunLock([tmp_path], force=False)
    taker.acquire()  # a dead process on this host: taken over with a warning
    assert "its process is gone" in caplog.text
    taker.release()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(RunLockedError, match="on elsewhere.*checkpoint.break_lock=true"):
        RunLock([tmp_path], force=False).acquire()
    RunLock([tmp_path], force=True).acquire()  # checkpoint.break_lock=true
    assert json.loads(lock.read_text())["host"] == socket.gethostname()


def _tag(root: Path, it: int) -> Path:
    tag = root / f"iter_{it:07d}"
    tag.mkdir(parents=True)
    write_meta(tag, {"iteration": it, "config": {}})
    write_manifest(tag)
    return tag


def test_resume_auto_takes_the_newest_complete_checkpoint_that_is_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    five, ten = _tag(tmp_path, 5), _tag(tmp_path, 10)
    (tmp_path / "latest").write_text("iter_0000005")  # `latest` behind: the newer one wins, with a warning
    assert choose_checkpoint(tmp_path, fallback=True) == ten
    assert "the newest intact checkpoint ('latest' names iter_0000005)" in caplog.text
    (tmp_path / "latest").write_text("iter_0000010")
    for f in sorted(ten.rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    ten.rmdir()  # deleted by hand
    assert choose_checkpoint(tmp_path, fallback=True) == five
    assert "names iter_0000010, which is missing or incomplete" in caplog.text
