"""Whose run directory is this? A run writes its checkpoints, metrics and config into one run
directory (`logging.dir`) and one checkpoint directory (`checkpoint.dir`); it must never write into
those of another run, nor replace a checkpoint of its own with a save of different content.

Checked on rank 0 under the run lock, before anything is written:

- `checkpoint.resume=PATH` outside `checkpoint.dir` (a branch from another run, a Hugging Face import)
  needs a `checkpoint.dir` without checkpoints and a `logging.dir` without another run's metrics;
- `checkpoint.resume=PATH` inside `checkpoint.dir` must be its newest complete checkpoint (the saves
  that follow would replace the newer ones);
- `checkpoint.resume=none` needs a `checkpoint.dir` without checkpoints (a fresh start would replace
  them one by one).

`checkpoint.resume=auto` continues the run that the directory holds, so it always passes.

Before that, every directory the run will write is probed (`check_writable`): created if missing, a
small file written, synced and removed. A read-only mount, a file where a directory should be, a
missing permission or a full disk is then one line naming the setting, the path and the cause at
start, not an OSError traceback from the run lock or a failed save hours later.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from llm.checkpoint.format import META, complete_tags, latest_tag
from llm.config import Config, ConfigError


class RunDirectoryError(ConfigError):
    """A run would write over another run's files (or replace its own newer checkpoints)."""


_CAUSES = {
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file of that name is in the way",
}


def check_writable(path: Path, setting: str) -> None:
    """Creates `path` if needed and writes, syncs and removes a small file in it; raises
    RunDirectoryError naming the setting, the path and the cause when that fails."""
    probe = path / f".llm-write-probe-{os.uname().nodename}-{os.getpid()}"
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
        path.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        cause = (
            "it is a file, not a directory"
            if path.is_file()
            else _CAUSES.get(e.errno or 0, e.strerror or str(e))
        )
        raise RunDirectoryError(
            f"{setting} '{path}' cannot be written: {cause}; choose a writable directory (or fix this one)"
        ) from None
    finally:
        with contextlib.suppress(OSError):  # nothing to remove where nothing could be written
            probe.unlink(missing_ok=True)


def run_directories(cfg: Config) -> dict[str, Path]:
    """Setting -> directory, for every directory rank 0 writes (wandb writes into logging.dir)."""
    out = {"logging.dir": Path(cfg.logging.dir), "checkpoint.dir": Path(cfg.checkpoint_dir)}
    if cfg.logging.tensorboard_dir:
        out["logging.tensorboard_dir"] = Path(cfg.logging.tensorboard_dir)
    return out


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _checkpoint_root(resume: Path) -> tuple[Path, str | None]:
    """The directory of checkpoints a resume path belongs to, and the tag it names (a tag directory's,
    or the one `latest` names)."""
    if (resume / META).is_file() or resume.name.startswith("iter_"):
        return resume.parent, resume.name
    return resume, latest_tag(resume)


def _names(tags: list[Path]) -> str:
    shown = ", ".join(t.name for t in tags[:3])
    return shown + (f" and {len(tags) - 3} more" if len(tags) > 3 else "")


def check_run_directory(cfg: Config) -> None:
    """Raises RunDirectoryError when this run would write over another run's checkpoints, metrics or
    config, or replace newer checkpoints of its own; the message names the files and the fix."""
    mode = cfg.checkpoint.resume
    if mode == "auto":
        return
    ckpt_dir, run_dir = Path(cfg.checkpoint_dir), Path(cfg.logging.dir)
    tags = complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    fresh = "set logging.dir (or checkpoint.dir) to a new directory"
    if mode == "none":
        if tags:
            raise RunDirectoryError(
                f"checkpoint.resume=none starts a new run, but checkpoint.dir '{ckpt_dir}' holds checkpoints "
                f"({_names(tags)}) that its saves would replace: {fresh}, or move them away; "
                "checkpoint.resume=auto continues them"
            )
        return
    resume = Path(mode)
    if not resume.exists():
        return  # the resume itself reports it
    root, chosen = _checkpoint_root(resume)
    if ckpt_dir.is_dir() and _same(root, ckpt_dir):
        newer = [t for t in tags if chosen is not None and t.name > chosen]
        if newer:
            raise RunDirectoryError(
                f"checkpoint.resume='{resume}' goes back past newer checkpoints of this run ({_names(newer)}) "
                f"that its saves would replace: move them out of '{ckpt_dir}' first, or {fresh} to branch from it"
            )
        return
    if tags:
        raise RunDirectoryError(
            f"checkpoint.dir '{ckpt_dir}' holds another run's checkpoints ({_names(tags)}); resuming from "
            f"'{resume}' would write this run's checkpoints among them: {fresh} (e.g. logging.dir="
            f"{run_dir.parent / (run_dir.name + '_from_' + root.parent.name)}), or use checkpoint.resume=auto "
            "to continue the run it holds"
        )
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        raise RunDirectoryError(
            f"logging.dir '{run_dir}' holds another run's metrics ({metrics}); resuming from '{resume}' would "
            f"append to them and replace its config.yaml: {fresh}"
        )
