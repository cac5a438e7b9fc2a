"""Tags, `llm_meta.json`, MANIFEST, `latest`: what makes a directory a complete checkpoint, and
which one to resume from. No torch, no DeepSpeed: tools read these files cheaply."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from llm.config import Config, ConfigError, config_from_dict
from llm.errors import LLMError

logger = logging.getLogger("llm")
META = "llm_meta.json"
MANIFEST = "MANIFEST.json"
LATEST = "latest"
LAYOUT_DIR, UNIVERSAL_DIR, RNG_DIR = "layout", "universal", "rng"
UNIVERSAL_FORM = "universal"  # meta["form"] of a checkpoint that holds only universal/ (an import)


class CheckpointError(LLMError, ValueError):
    """A checkpoint that is missing, incomplete or cannot be read; the message names the file."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_tag(directory: str | Path) -> str | None:
    f = Path(directory) / LATEST
    return f.read_text().strip() if f.is_file() else None


def atomic_write(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a part (rename within one directory)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def set_latest(directory: Path, tag: str) -> None:
    atomic_write(directory / LATEST, tag)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (with `latest`) or one tag directory -> the tag directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist")
    if (p / META).is_file():
        return p
    tag = latest_tag(p)
    if tag is None:
        raise CheckpointError(
            f"'{p}' holds no checkpoint (no '{LATEST}' file and no {META}); pass a checkpoint directory"
        )
    if not (p / tag / META).is_file():
        raise CheckpointError(
            f"checkpoint '{p / tag}' named by '{p / LATEST}' is missing or incomplete ({META} absent)"
        )
    return p / tag


# ------------------------------------------------------------------------------------ meta


def build_meta(state: dict[str, Any], cfg: Config, *, zero_stage: int, world_size: int) -> dict[str, Any]:
    """What `llm_meta.json` holds for a checkpoint saved by training."""
    return dict(
        state,
        config=cfg.to_dict(),
        zero_stage=zero_stage,
        tensor_parallel=cfg.parallel.tensor_model_parallel_size,
        pipeline_parallel=cfg.parallel.pipeline_model_parallel_size,
        world_size=world_size,
    )


def write_meta(tag_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write(tag_dir / META, json.dumps(meta, indent=1))


def read_meta(tag_dir: str | Path) -> dict[str, Any]:
    path = Path(tag_dir) / META
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read '{path}': {e}") from None


def config_from_meta(meta: dict[str, Any], *, source: str = "checkpoint") -> Config:
    """The run's config saved in the checkpoint, validated like one read from YAML."""
    try:
        return config_from_dict(meta["config"], source=f"{source} ({META})")
    except KeyError:
        raise CheckpointError(f"{source}: {META} holds no config") from None
    except ConfigError as e:
        raise CheckpointError(f"{source}: the saved config is not valid ({e})") from None


def is_universal_only(meta: dict[str, Any]) -> bool:
    """A checkpoint that holds only the layout-independent form (a Hugging Face import)."""
    return meta.get("form") == UNIVERSAL_FORM or "imported_from" in meta


def layout_of(meta: dict[str, Any]) -> dict[str, int] | None:
    """TP, PP, DP and ZeRO stage the checkpoint was written at; None for the universal form only."""
    if is_universal_only(meta):
        return None
    tp, pp = int(meta.get("tensor_parallel", 1)), int(meta.get("pipeline_parallel", 1))
    return {"tp": tp, "pp": pp, "dp": int(meta.get("world_size", tp * pp)) // (tp * pp),
            "zero": int(meta.get("zero_stage", 0))}  # fmt: skip


# -------------------------------------------------------------------------------- manifest


def write_manifest(tag_dir: Path) -> None:
    """Every file of the checkpoint and its size (universal/ is derived data and not listed)."""
    files = {
        str(f.relative_to(tag_dir)): f.stat().st_size
        for f in sorted(tag_dir.rglob("*"))
        if f.is_file() and f.name != MANIFEST and not f.relative_to(tag_dir).parts[0].startswith(UNIVERSAL_DIR)
    }
    atomic_write(tag_dir / MANIFEST, json.dumps(files, indent=0))


def verify_checkpoint(tag_dir: Path) -> None:
    """Every file the MANIFEST lists is present with its size; raises CheckpointError naming the first that is not."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"checkpoint '{tag_dir}' is incomplete (no {MANIFEST}: its save was interrupted); use an earlier one"
        )
    try:
        files = json.loads(manifest.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{manifest}' is damaged ({e}); use an earlier checkpoint") from None
    for name, size in files.items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file '{f}' is missing; use an earlier checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file '{f}' is damaged ({f.stat().st_size} bytes, {size} written); use an earlier checkpoint"
            )


# ------------------------------------------------------------------------- choosing, pruning


def complete_tags(directory: Path) -> list[Path]:
    """Checkpoints with a MANIFEST, newest first (the one `latest` names comes first)."""
    tags = sorted((p for p in directory.glob("iter_*") if (p / MANIFEST).is_file()), reverse=True)
    named = latest_tag(directory)
    return sorted(tags, key=lambda p: p.name != named)


def prune(directory: Path, keep_last: int, *, keep: str) -> None:
    """Deletes all but the newest `keep_last` checkpoints (never `keep`)."""
    tags = sorted(p for p in directory.glob("iter_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def choose_checkpoint(path: str | Path, *, fallback: bool) -> Path:
    """The tag directory to resume from. With `fallback` (resume: auto), a damaged or incomplete newest
    checkpoint is skipped with a warning for the newest complete one."""
    tag_dir = resolve_checkpoint(path)
    if not fallback:
        verify_checkpoint(tag_dir)
        return tag_dir
    candidates = [tag_dir] + [t for t in complete_tags(tag_dir.parent) if t != tag_dir]
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            return candidate
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
    raise CheckpointError(f"no complete checkpoint in '{tag_dir.parent}'; start fresh with checkpoint.resume=none")


# --------------------------------------------------------------------------- rank layouts


def read_rank_layouts(tag_dir: Path) -> list[dict[str, Any]]:
    """Every rank's `layout/rank_NNNNN.json` (coordinates, file names, parameter layouts)."""
    files = sorted((tag_dir / LAYOUT_DIR).glob("rank_*.json"))
    if not files:
        raise CheckpointError(
            f"checkpoint '{tag_dir}' has no {LAYOUT_DIR}/ files (written by an older llm): resume it at its "
            "own layout, or start fresh from its weights"
        )
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint file '{f}' is damaged ({e}); use an earlier checkpoint") from None
    return out


def parameter_specs(layouts: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Plain-model parameter name -> its tensor-parallel split as saved ({"dim", "stride"} or {"qkv"};
    None when replicated), from the rank layout files."""
    specs: dict[str, dict[str, Any] | None] = {}
    for info in layouts:
        if "params" not in info:
            raise CheckpointError(
                "the checkpoint's layout files carry no parameter layouts (written by an older llm); its "
                "tensor-parallel shards cannot be merged: resume it at its own layout"
            )
        for name, entry in info["params"].items():
            specs.setdefault(name, entry["spec"])
    return specs
