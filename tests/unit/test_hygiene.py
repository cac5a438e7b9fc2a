"""The suite's own safety: every launched process has a deadline, and a test that fails or hangs
leaves no process behind (a launcher's workers included)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return True  # a zombie waiting for its (dead) parent's reaper: not running
        time.sleep(0.1)
    return False


def test_a_command_past_its_deadline_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):  # a launcher whose worker hangs
        run(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], timeout=3)
    assert _gone(int(pid_file.read_text()))


def test_a_test_stopped_by_the_suite_timeout_leaves_no_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    test = tmp_path / "test_hangs.py"
    test.write_text(
        "from tests.conftest import run\n"
        "def test_hangs():\n"
        f"    run(['bash', '-c', 'sleep 300 & echo $! > {pid_file}; wait'], timeout=600)\n"
    )
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "4", str(test),
                        "--rootdir", str(REPO), "--confcutdir", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 1 and "Timeout" in p.stdout + p.stderr, p.stdout[-2000:]
    assert _gone(int(pid_file.read_text()))


def _hang(rank: int, world: int, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(300)


@pytest.mark.distributed
def test_distributed_processes_past_their_deadline_are_killed(tmp_path: Path) -> None:
    from tests.distributed.harness import spawn

    with pytest.raises(TimeoutError, match="ran longer than 3 s: killed"):
        spawn(_hang, 2, str(tmp_path), timeout=3)
    pids = [int(f.read_text()) for f in tmp_path.glob("*.pid")]
    assert len(pids) == 2 and all(_gone(p) for p in pids)
