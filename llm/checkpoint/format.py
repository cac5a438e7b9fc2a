"""Tags, `llm_meta.json`, MANIFEST, `latest`: what makes a directory a complete checkpoint, and
which one to resume from. No torch, no DeepSpeed: tools read these files cheaply.

MANIFEST.json lists every file of a checkpoint with its size and its xxh3-64 checksum (about 15 GB/s
on one core, so reading the file costs more than hashing it: docs/benchmarks.md). Saving and
verifying split the files over the ranks (`share`): each rank hashes every world-th file."""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, TypeVar

import xxhash

from llm.config import Config, ConfigError, config_from_dict
from llm.errors import LLMError

logger = logging.getLogger("llm")
META = "llm_meta.json"
MANIFEST = "MANIFEST.json"
LATEST = "latest"
# SHARD_MAP_DIR: every rank's shard map (named `layout/` since the first checkpoints; kept for them)
SHARD_MAP_DIR, UNIVERSAL_DIR, RNG_DIR, DILOCO_DIR = "layout", "universal", "rng", "diloco"
UNIVERSAL_FORM = "universal"  # meta["form"] of a checkpoint that holds only universal/ (an import)
CHECKSUM = "xxh3_64"
MANIFEST_VERSION = 2  # 1: {name: size}; 2: {"files": {name: {"size", "xxh3_64"}}}
_CHUNK = 16 << 20
T = TypeVar("T")


class CheckpointError(LLMError, ValueError):
    """A checkpoint that is missing, incomplete or cannot be read; the message names the file."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_tag(directory: str | Path) -> str | None:
    f = Path(directory) / LATEST
    return f.read_text().strip() if f.is_file() else None


def atomic_write(path: Path, text: str, *, durable: bool = False) -> None:
    """Readers see the old content or the new one, never a part (rename within one directory).
    `durable`: the new content is on disk before the rename, and the rename before this returns (a
    machine that loses power afterwards comes back with the new file, never an empty one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        sync_directory(path.parent)


def sync_file(path: Path) -> None:
    """fsync of a file written without it: its bytes are on disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


def sync_directory(directory: Path) -> None:
    """fsync of a directory: the names created, renamed or removed in it are on disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """sync_directory for `root` and every directory below it."""
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        sync_directory(directory)


def set_latest(directory: Path, tag: str, *, durable: bool = False) -> None:
    atomic_write(directory / LATEST, tag, durable=durable)


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
    """What `llm_meta.json` holds for a checkpoint saved by training. The config is the run's, less how
    the checkpoint was written (checkpoint.async_save, and the debug settings that slow its parts):
    an asynchronous save writes the same bytes as a synchronous one."""
    config = cfg.to_dict()
    config["checkpoint"].pop("async_save", None)
    for name in ("checkpoint_write_delay_seconds", "checkpoint_copy_delay_seconds"):
        config["debug"].pop(name, None)
    return dict(
        state,
        config=config,
        zero_stage=zero_stage,
        tensor_parallel=cfg.parallel.tensor_model_parallel_size,
        pipeline_parallel=cfg.parallel.pipeline_model_parallel_size,
        expert_parallel=cfg.parallel.expert_model_parallel_size,
        context_parallel=cfg.parallel.context_parallel_size,
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
    """TP, PP, DP, EP and ZeRO stage the checkpoint was written at; None for the universal form only."""
    if is_universal_only(meta):
        return None
    tp, pp = int(meta.get("tensor_parallel", 1)), int(meta.get("pipeline_parallel", 1))
    cp = int(meta.get("context_parallel", 1))
    return {"tp": tp, "pp": pp, "dp": int(meta.get("world_size", tp * pp * cp)) // (tp * pp * cp),
            "ep": int(meta.get("expert_parallel", 1)), "cp": cp, "zero": int(meta.get("zero_stage", 0))}  # fmt: skip


# -------------------------------------------------------------------------------- manifest


def file_checksum(path: Path, *, durable: bool = False) -> str:
    """xxh3-64 of a file's bytes (hex), hashed straight from a memory map: no copies. `durable`: the
    file's bytes are also flushed to disk (fsync: whichever process wrote them, the page cache's
    dirty pages of the file are written out), so a checksum never describes bytes a crash can lose."""
    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                for start in range(0, len(view), _CHUNK):
                    h.update(view[start : start + _CHUNK])
        if durable:
            os.fsync(f.fileno())
    return h.hexdigest()


def checkpoint_files(tag_dir: Path, *, universal: bool = False) -> list[str]:
    """The files MANIFEST lists, sorted. universal/ is derived data of a saved checkpoint (written by a
    resume at another layout) and not listed; in an import it is the checkpoint (`universal`: listed)."""
    return sorted(
        str(f.relative_to(tag_dir))
        for f in tag_dir.rglob("*")
        if f.is_file() and f.name != MANIFEST and not f.name.startswith(".")
        and (universal or not f.relative_to(tag_dir).parts[0].startswith(UNIVERSAL_DIR))
    )  # fmt: skip


def share(names: list[T], rank: int, world: int) -> list[T]:
    """This rank's part of the files to hash: every world-th, starting at `rank`."""
    return names[rank::world]


def describe_files(tag_dir: Path, names: list[str], *, durable: bool = False) -> dict[str, dict[str, Any]]:
    """name -> {"size", "xxh3_64"} for the given files (`durable`: each also flushed to disk)."""
    return {
        n: {"size": (tag_dir / n).stat().st_size, CHECKSUM: file_checksum(tag_dir / n, durable=durable)}
        for n in names
    }


def write_manifest(
    tag_dir: Path, files: dict[str, dict[str, Any]] | None = None, *, durable: bool = False
) -> None:
    """MANIFEST.json from the files' sizes and checksums (computed here when not given). `durable`:
    the directories' entries are flushed first, then MANIFEST itself (the files were, by
    describe_files); a checkpoint whose MANIFEST survives a power loss has every byte it lists."""
    if files is None:
        files = describe_files(tag_dir, checkpoint_files(tag_dir), durable=durable)
    if durable:
        sync_tree(tag_dir)
        sync_directory(tag_dir.parent)  # the checkpoint's own name
    body = {"version": MANIFEST_VERSION, "checksum": CHECKSUM, "files": dict(sorted(files.items()))}
    atomic_write(tag_dir / MANIFEST, json.dumps(body, indent=0), durable=durable)


def read_manifest(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> {"size"[, "xxh3_64"]}; a checkpoint without a readable MANIFEST is incomplete."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"checkpoint '{tag_dir}' is incomplete (no {MANIFEST}: its save was interrupted); use an earlier one"
        )
    try:
        body = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{manifest}' is damaged ({e}); use an earlier checkpoint") from None
    if "files" not in body:  # version 1: sizes only
        return {name: {"size": size} for name, size in body.items()}
    return dict(body["files"])


def verify_checkpoint(tag_dir: Path, *, rank: int = 0, world: int = 1, checksums: bool = True) -> None:
    """Every file the MANIFEST lists is present with its size, and (for this rank's share) its
    checksum; raises CheckpointError naming the first file that is not, with both checksums."""
    files = read_manifest(tag_dir)
    for name, entry in files.items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file '{f}' is missing; use an earlier checkpoint")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(
                f"checkpoint file '{f}' is damaged ({f.stat().st_size} bytes, {entry['size']} written); "
                "use an earlier checkpoint"
            )
    if not checksums:
        return
    for name in share(sorted(files), rank, world):
        expected = files[name].get(CHECKSUM)
        if expected is None:
            continue  # written before checksums (MANIFEST version 1)
        found = file_checksum(tag_dir / name)
        if found != expected:
            raise CheckpointError(
                f"checkpoint file '{tag_dir / name}' is damaged: {CHECKSUM} {found}, written as {expected}; "
                "use an earlier checkpoint"
            )


def checkpoint_bytes(tag_dir: Path) -> int:
    """The size of a complete checkpoint, from its MANIFEST (0 when it has none)."""
    try:
        return sum(int(e["size"]) for e in read_manifest(tag_dir).values())
    except CheckpointError:
        return 0


# ------------------------------------------------------------------------- choosing, pruning


def complete_tags(directory: Path) -> list[Path]:
    """Checkpoints with a MANIFEST, newest first."""
    return sorted((p for p in directory.glob("iter_*") if (p / MANIFEST).is_file()), reverse=True)


def prune(directory: Path, keep_last: int, *, keep: str) -> None:
    """Deletes all but the newest `keep_last` checkpoints (never `keep`)."""
    tags = sorted(p for p in directory.glob("iter_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def choose_checkpoint(path: str | Path, *, fallback: bool, verify: Any = None) -> Path:
    """The tag directory to resume from. With `fallback` (resume: auto), a damaged or incomplete newest
    checkpoint is skipped with a warning for the newest complete one; without, it is an error.
    `verify(tag_dir)` raises CheckpointError for a damaged one (default: `verify_checkpoint`; training
    passes one that splits the checksums over the ranks and agrees on the result)."""
    check = verify or verify_checkpoint
    if not fallback:
        tag_dir = resolve_checkpoint(path)
        check(tag_dir)
        return tag_dir
    root = Path(path).parent if (Path(path) / META).is_file() else Path(path)
    named = latest_tag(root)
    if named is not None and not (root / named / MANIFEST).is_file():
        logger.warning("'%s' names %s, which is missing or incomplete", root / LATEST, named)
    for candidate in complete_tags(root):  # the newest complete one that is there, whatever `latest` says
        try:
            check(candidate)
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
            continue
        if named is not None and candidate.name != named:
            logger.warning(
                "resuming from %s, the newest intact checkpoint ('latest' names %s)", candidate.name, named
            )
        return candidate
    raise CheckpointError(f"no complete checkpoint in '{root}'; start fresh with checkpoint.resume=none")


# ----------------------------------------------------------------------------- shard maps


def read_shard_maps(tag_dir: Path) -> list[dict[str, Any]]:
    """Every rank's shard map, `layout/rank_NNNNN.json` (coordinates, file names, parameter splits)."""
    files = sorted((tag_dir / SHARD_MAP_DIR).glob("rank_*.json"))
    if not files:
        raise CheckpointError(
            f"checkpoint '{tag_dir}' has no {SHARD_MAP_DIR}/ files (written by an older llm): resume it at its "
            "own layout, or start fresh from its weights"
        )
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"checkpoint file '{f}' is damaged ({e}); use an earlier checkpoint"
            ) from None
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


# ------------------------------------------------------------------------ same model on resume

# Model settings a resume may change: they change neither a tensor nor what the weights compute.
RESUMABLE_MODEL_KEYS = (
    "activation_checkpointing",
    "sequence_parallel",
    "dropout",
    "attention_dropout",
    "init_std",
    "compile",
    "loss_chunk_tokens",
)


def model_differences(meta: dict[str, Any], cfg: Config, *, tokenizer_fingerprint: str | None) -> list[str]:
    """What differs between the checkpoint's model (and tokenizer) and the run's, one entry per setting:
    `model.num_layers: checkpoint 2, config 3`."""
    saved = dict(meta.get("config", {}).get("model", {}))
    ours = cfg.to_dict()["model"]
    out = [
        f"model.{key}: checkpoint {saved[key]!r}, config {value!r}"
        for key, value in ours.items()
        if key in saved and key not in RESUMABLE_MODEL_KEYS and saved[key] != value
    ]
    theirs = meta.get("tokenizer_fingerprint")
    if theirs and tokenizer_fingerprint and theirs != tokenizer_fingerprint:
        saved_name = meta.get("config", {}).get("data", {}).get("tokenizer")
        out.append(
            f"data.tokenizer: checkpoint {saved_name!r} (fingerprint {theirs}), config "
            f"{cfg.data.tokenizer!r} (fingerprint {tokenizer_fingerprint}): a different tokenizer"
        )
    return out


def check_same_model(
    meta: dict[str, Any], cfg: Config, tag_dir: Path, *, tokenizer_fingerprint: str | None
) -> None:
    """Refuses to resume a checkpoint of another model, naming every differing setting."""
    diffs = model_differences(meta, cfg, tokenizer_fingerprint=tokenizer_fingerprint)
    if diffs:
        raise CheckpointError(
            f"checkpoint '{tag_dir}' holds another model than the config describes: {'; '.join(diffs)}. Use the "
            "checkpoint's values, or start fresh with checkpoint.resume=none (or another checkpoint.dir)"
        )
