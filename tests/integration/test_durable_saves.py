"""Durable checkpoints (checkpoint.fsync, on by default): observed through the system calls the
processes really make (strace, following every process: the ranks, torchrun, the background
writer). Before a checkpoint's MANIFEST is renamed into place, every file it lists and every
directory of the checkpoint has been flushed to disk, and the MANIFEST itself; `latest` moves only
after that, and its directory is flushed after the move. A power loss or kernel crash then leaves
`latest` on a checkpoint whose every listed byte is on disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import check, launch_cmd, run, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")]
CALL = re.compile(r'^\d+ +(fsync|rename)\((?:\d+<([^>]*)>|"([^"]*)", "([^"]*)")')


def _traced(nproc: int, args: list[str], trace: Path) -> list[tuple[str, str]]:
    """The run under strace: its fsync (of a path) and rename (to a path) calls, in order."""
    strace = ["strace", "-f", "-qq", "-y", "--seccomp-bpf", "-e", "trace=fsync,rename", "-o", str(trace)]
    check(run([*strace, *launch_cmd(nproc, *args)]))
    calls = []
    for line in trace.read_text().splitlines():
        if (m := CALL.match(line)) and not line.rstrip().endswith(("= -1", "resumed>")):
            calls.append((m[1], m[2] if m[1] == "fsync" else m[4]))
    return calls


def _problems(calls: list[tuple[str, str]], checkpoints: Path) -> list[str]:
    """What a crash could lose: for every checkpoint, the files, directories and MANIFEST not flushed
    before the step that makes them count, and a `latest` not flushed after its move."""
    problems: list[str] = []
    latest_moves = [i for i, c in enumerate(calls) if c == ("rename", str(checkpoints / "latest"))]
    for tag_dir in sorted(checkpoints.glob("iter_*")):
        manifest = tag_dir / "MANIFEST.json"
        listed = json.loads(manifest.read_text())["files"]
        renamed = calls.index(("rename", str(manifest)))
        synced = {path for kind, path in calls[:renamed] if kind == "fsync"}
        problems += [f"{tag_dir.name}/{name} not flushed" for name in listed if str(tag_dir / name) not in synced]
        dirs = [tag_dir, checkpoints, *(p for p in tag_dir.rglob("*") if p.is_dir() and p.name != "universal")]
        problems += [f"directory {d} not flushed" for d in dirs if str(d) not in synced]
        manifest_tmp = [p for p in synced if Path(p).parent == tag_dir and ".MANIFEST.json.tmp" in p]
        problems += [] if manifest_tmp else [f"{tag_dir.name}: MANIFEST not flushed before its rename"]
        after = [i for i in latest_moves if i > renamed]
        if not after:
            problems.append(f"{tag_dir.name}: latest moved before its MANIFEST")
        elif ("fsync", str(checkpoints)) not in calls[after[0] :]:
            problems.append(f"{tag_dir.name}: the move of latest not flushed")
    return problems


def test_every_byte_a_checkpoint_lists_is_on_disk_before_latest_names_it(builtin_prefix: Path, tmp_path: Path) -> None:
    """Synchronous saves over two ranks (each flushes the files it hashes), asynchronous saves (the
    writer process writes, the flush follows in the writer thread), and checkpoint.fsync=false (no
    file of a checkpoint is flushed: the page cache writes it out later)."""
    saves = ["train.train_iters=4", "checkpoint.save_interval=2"]
    for name, nproc, extra in (("sync", 2, []), ("async", 1, ["checkpoint.async_save=true"])):
        run_dir = tmp_path / name
        calls = _traced(nproc, tiny_args(builtin_prefix, run_dir, *saves, *extra), tmp_path / f"{name}.trace")
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_0000002", "iter_0000004"]
        assert _problems(calls, run_dir / "checkpoints") == [], name

    run_dir = tmp_path / "off"
    calls = _traced(1, tiny_args(builtin_prefix, run_dir, *saves, "checkpoint.fsync=false"), tmp_path / "off.trace")
    checkpoints = run_dir / "checkpoints"
    flushed = [Path(path) for kind, path in calls if kind == "fsync"]
    assert [p for p in flushed if p == checkpoints or p.parent == checkpoints and "latest" in p.name
            or checkpoints in p.parents and p.relative_to(checkpoints).parts[0].startswith("iter_")] == []  # fmt: skip
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000004"
