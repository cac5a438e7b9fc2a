"""Files written under a temporary name and renamed into place, readable as the umask allows.

`tempfile.mkstemp` creates its file with mode 0600 whatever the umask, and a rename keeps the mode:
token files and index caches written that way could be read by their owner only, so on a shared
filesystem the rest of a team (or a job running as another user) could not read the corpus. Every
temporary file here gets the mode an ordinary `open()` would have given it (0666 minus the umask)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_file(
    directory: Path, *, prefix: str, suffix: str, executable: bool = False
) -> tuple[int, Path]:
    """(open descriptor, path) of a new file in `directory` with the mode `open()` would give it
    (0777 minus the umask for an `executable`), to be renamed over its final name when complete."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.fchmod(fd, (0o777 if executable else 0o666) & ~current_umask())
    return fd, Path(tmp)
