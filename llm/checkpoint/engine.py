"""Saving and loading through a DeepSpeed engine: DeepSpeed's own files plus ours (meta, per-rank
RNG streams and layouts, MANIFEST, `latest`), and resuming at another layout through reshard.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint import reshard, writer
from llm.checkpoint.background import BackgroundSave
from llm.checkpoint.experts import load_expert_shard, write_expert_shard
from llm.checkpoint.format import (
    DILOCO_DIR,
    MANIFEST,
    RNG_DIR,
    SHARD_MAP_DIR,
    UNIVERSAL_DIR,
    CheckpointError,
    build_meta,
    check_same_model,
    checkpoint_bytes,
    checkpoint_files,
    choose_checkpoint,
    describe_files,
    latest_tag,
    layout_of,
    prune,
    read_meta,
    set_latest,
    share,
    sync_file,
    tag_for,
    verify_checkpoint,
    write_manifest,
    write_meta,
)
from llm.checkpoint.pickles import (
    UnsafeCheckpointError,
    check_files,
    load_file,
    pickled_files,
)
from llm.checkpoint.rng import rng_state
from llm.config import Config
from llm.engine.internals import (
    checkpoint_file_names,
    optimizer_parameter_order,
    write_failures_kept,
    zipfile_serialization,
)
from llm.errors import LLMError, on_every_rank
from llm.model.names import canonical_name
from llm.parallel.layers import full_shape_of, partition_info
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker

logger = logging.getLogger("llm")


class CheckpointSaveError(CheckpointError):
    """A save that failed (no space, permission, I/O error); `latest` and earlier checkpoints are intact."""


def save_checkpoint(
    engine: Any,
    cfg: Config,
    state: dict[str, Any],
    *,
    ctx: ParallelContext,
    rng: RNGTracker | None,
    rank_state: dict[str, Any] | None = None,
    background: BackgroundSave | None = None,
) -> Path:
    """Saves through DeepSpeed (every rank); the checkpoint becomes visible only when all ranks are done.

    Order: llm_meta.json, per-rank RNG and layout files, DeepSpeed's files, every torch file through
    writer.py (hashed while written, flushed behind with checkpoint.fsync); every rank then hashes
    its share of the other files; rank 0 writes MANIFEST (every file, its size and checksum) and finally
    moves `latest` (atomic rename). A process killed anywhere before that leaves `latest` on the
    previous checkpoint. A failure on any rank (no space, permission, I/O) is agreed on by all ranks
    at the next step of this sequence: the partial directory is removed and every rank raises
    CheckpointSaveError naming the directory and the cause, so none is left waiting.

    `rng`: the model's tensor-parallel RNG tracker; its streams and torch's go to `rng/rank_NNNNN.pt`.
    `rank_state` (DiLoCo's outer state) goes to `diloco/rank_NNNNN.pt`. With DiLoCo islands, island
    0's files are the checkpoint as any tool reads it (world_size in the meta is one island's) and
    island k > 0 keeps its own DeepSpeed files under `island_k/` for an exact resume.

    `background` (checkpoint.async_save): after waiting for the save in flight, DeepSpeed's files are
    captured as host copies and the rest of the sequence (filling the copies, writing them, hashing,
    MANIFEST, `latest`) runs in its writer thread, on its own process group (background.py); the
    call returns once the copies are laid out, and the next optimizer step waits until they are filled
    (BackgroundSave.before_update).
    """
    if background is not None:
        background.wait()  # at most one save in flight; raises its failure on every rank
    directory, rank = Path(cfg.checkpoint_dir), ctx.rank
    tag_dir = directory / tag_for(int(state["iteration"]))
    meta = build_meta(
        state, cfg, zero_stage=int(engine.zero_optimization_stage()), world_size=ctx.island_size
    )
    if ctx.islands > 1:
        meta["diloco_islands"] = ctx.islands
    previous = latest_tag(directory)
    durable = cfg.checkpoint.fsync
    # the files written before an asynchronous save returns are flushed later, in the background
    flush_now = durable and background is None

    def start() -> None:
        _clear_tag(tag_dir)
        tag_dir.mkdir(parents=True)
        write_meta(tag_dir, meta)

    def write_rank_files() -> None:
        (tag_dir / RNG_DIR).mkdir(parents=True, exist_ok=True)
        writer.save(rng_state(rng), tag_dir / RNG_DIR / f"rank_{rank:05d}.pt", durable=flush_now)
        if rank_state is not None:
            (tag_dir / DILOCO_DIR).mkdir(parents=True, exist_ok=True)
            writer.save(rank_state, tag_dir / DILOCO_DIR / f"rank_{rank:05d}.pt", durable=flush_now)
        if ctx.island == 0:
            write_shard_map(engine, ctx, tag_dir, num_layers=cfg.model.num_layers)
            # MoE: every expert-parallel rank's experts (DeepSpeed's model file holds rank 0's only);
            # written here also by an asynchronous save
            write_expert_shard(engine.module, ctx, tag_dir, num_layers=cfg.model.num_layers, durable=flush_now)
        root = island_root(directory, tag_dir, ctx)
        (root / tag_dir.name).mkdir(parents=True, exist_ok=True)

    captured: list[tuple[str, Any, dict[int, str]]] = []
    zipfile = zipfile_serialization(engine)

    def write_file(state: Any, path: str) -> None:  # each of DeepSpeed's files
        if background is None:
            writer.save(state, path, durable=durable, zipfile=zipfile)
        else:  # a host copy now, written in the background
            captured.append((path, *background.copy(state)))

    def write_deepspeed_files() -> None:
        root = island_root(directory, tag_dir, ctx)
        # through DeepSpeed's barriers; the ranks agree afterwards
        with write_failures_kept(engine, write=write_file) as kept:
            engine.save_checkpoint(str(root), tag=tag_dir.name, client_state={"llm": meta}, save_latest=False)
        if kept.error is not None:
            raise kept.error

    def complete(ctx: ParallelContext) -> None:  # now, or in the writer thread with its own context
        mine: dict[str, Any] = {}

        if captured:
            assert background is not None
            _agreed(ctx, tag_dir, previous, lambda: background.write(captured, zipfile=zipfile, durable=durable))
            captured.clear()  # the host copies go as soon as they are written
        # the files every rank hashed while writing them (writer.py); the rest, each rank its share
        recorded = writer.take_recorded(tag_dir)
        written = {name: entry for part in ctx.all_gather_object(writer.for_manifest(recorded))
                   for name, entry in part.items()}  # fmt: skip

        listed: list[str] = []  # every file of the checkpoint, listed once

        def hash_share() -> None:  # everyone has written: the same list of files on every rank
            if durable:  # this rank's files written in an asynchronous save's blocking part
                for name in [n for n, entry in recorded.items() if not entry["flushed"]]:
                    sync_file(tag_dir / name)
            listed[:] = checkpoint_files(tag_dir)
            names = share([n for n in listed if n not in written], rank, ctx.world_size)
            mine.update(describe_files(tag_dir, names, durable=durable))

        _agreed(ctx, tag_dir, previous, hash_share)
        shares = ctx.all_gather_object(mine)

        def finish() -> None:
            names = set(listed)
            files = {name: entry for part in [written, *shares] for name, entry in part.items() if name in names}
            write_manifest(tag_dir, files, durable=durable)
            set_latest(directory, tag_dir.name, durable=durable)
            if cfg.checkpoint.keep_last:
                prune(directory, cfg.checkpoint.keep_last, keep=tag_dir.name)
            _warn_if_next_save_cannot_fit(tag_dir)

        _agreed(ctx, tag_dir, previous, finish if rank == 0 else None)

    # every torch file of the checkpoint, DeepSpeed's too, through writer.py
    _agreed(ctx, tag_dir, previous, start if rank == 0 else None)
    _agreed(ctx, tag_dir, previous, write_rank_files)
    _agreed(ctx, tag_dir, previous, write_deepspeed_files)
    if background is None:
        complete(ctx)
    else:
        background.start(complete, tag_dir)
    return tag_dir


REPLACED_DIR = "replaced"


def _clear_tag(tag_dir: Path) -> None:
    """Makes room for a save to `tag_dir`. A complete checkpoint there (one that a resume skipped as
    damaged, or that this run went back past) is never replaced in place: it is moved to
    `replaced/<tag>.<time>/` beside the checkpoints, with a warning. An incomplete one (an interrupted
    save) is removed, so that none of its files can enter the new MANIFEST."""
    if not tag_dir.exists():
        return
    if (tag_dir / MANIFEST).is_file():
        aside = tag_dir.parent / REPLACED_DIR / f"{tag_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(exist_ok=True)
        os.replace(tag_dir, aside)
        logger.warning("checkpoint %s already existed: it was moved to %s, not overwritten", tag_dir, aside)
    else:
        shutil.rmtree(tag_dir)


def island_root(directory: Path, tag_dir: Path, ctx: ParallelContext) -> Path:
    """Where this rank's island keeps DeepSpeed's files: the checkpoint directory for island 0,
    `<tag>/island_k/` (holding `<tag>/`) for the others (DeepSpeed's tags must agree on all ranks)."""
    return directory if ctx.island == 0 else tag_dir / f"island_{ctx.island}"


def _agreed(ctx: ParallelContext, tag_dir: Path, previous: str | None, step: Any) -> None:
    """Runs this rank's `step` (None: nothing to do here), then all ranks learn whether any failed:
    each raises the same CheckpointSaveError, naming the first failing rank, its path and cause."""
    failure: str | None = None
    if step is not None:
        try:
            step()
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            failure = _save_failure(tag_dir, previous, e)
    found = ctx.first_failure(failure)
    if found is None:
        return
    # never a half-written checkpoint left behind (a complete one there was moved aside); every rank
    # removes what it sees, for a directory that is not shared by all
    shutil.rmtree(tag_dir, ignore_errors=True)
    r, message = found
    raise on_every_rank(CheckpointSaveError(message if ctx.world_size == 1 else f"rank {r}: {message}"))


def _is_disk_full(error: BaseException) -> bool:
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or any(
        s in text
        for s in ("No space left", "unexpected pos", "file write failed", "PytorchStreamWriter failed")
    )


def _save_failure(tag_dir: Path, previous: str | None, error: BaseException) -> str:
    keep = f"'latest' still names {previous or 'no checkpoint'}, which is intact"
    if _is_disk_full(error):
        free = _free_bytes(tag_dir.parent)
        needed = checkpoint_bytes(tag_dir.parent / previous) if previous else 0
        estimate = f", a checkpoint needs about {_gb(needed)} (the previous one)" if needed else ""
        return (
            f"saving checkpoint '{tag_dir}' failed: no space left on the device of '{tag_dir.parent}' "
            f"({_gb(free)} free{estimate}); free space, set checkpoint.keep_last or move checkpoint.dir. {keep}"
        )
    cause = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
    return f"saving checkpoint '{tag_dir}' failed: {cause}; {keep}"


def _free_bytes(directory: Path) -> int:
    try:
        return int(shutil.disk_usage(directory).free)
    except OSError:
        return 0


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def _warn_if_next_save_cannot_fit(tag_dir: Path) -> None:
    """One save ahead: the next checkpoint will be about as large as this one."""
    size, free = checkpoint_bytes(tag_dir), _free_bytes(tag_dir.parent)
    if size > free:
        logger.warning(
            "only %s free on the device of '%s' and a checkpoint takes %s: the next save will fail unless "
            "space is freed (checkpoint.keep_last, or another checkpoint.dir)",
            _gb(free),
            tag_dir.parent,
            _gb(size),
        )


def choose_verified(path: str | Path, ctx: ParallelContext, *, fallback: bool, checksums: bool) -> Path:
    """`choose_checkpoint` with every candidate verified by all ranks together (`verify_distributed`)."""
    return choose_checkpoint(
        path, fallback=fallback, verify=lambda t: verify_distributed(t, ctx, checksums=checksums)
    )


def _checked_by_all(ctx: ParallelContext, check: Callable[[], None], error: type[LLMError]) -> None:
    """Runs this rank's share of a check; every rank raises `error` with the first failing rank's message."""
    message = None
    try:
        check()
    except error as e:
        message = str(e)
    found = ctx.first_failure(message)
    if found is not None:
        raise error(found[1])


def verify_distributed(tag_dir: Path, ctx: ParallelContext, *, checksums: bool = True) -> None:
    """`verify_checkpoint` with the checksums split over the ranks; every rank raises if any found damage."""
    _checked_by_all(
        ctx,
        lambda: verify_checkpoint(tag_dir, rank=ctx.rank, world=ctx.world_size, checksums=checksums),
        CheckpointError,
    )


def check_pickles_distributed(tag_dir: Path, ctx: ParallelContext) -> None:
    """pickles.check_files over every torch file of the checkpoint, split over the ranks; every rank
    raises the first refusal any rank found."""
    _checked_by_all(ctx, lambda: check_files(share(pickled_files(tag_dir), ctx.rank, ctx.world_size)),
                    UnsafeCheckpointError)  # fmt: skip


def parameter_splits(module: torch.nn.Module, num_layers: int) -> dict[str, dict[str, Any]]:
    """Plain-model name -> how this rank holds the parameter: its tensor-parallel split (the layer's
    own `partition_info`: dimension and stride, or the grouped-QKV layout with KV rows shared by
    several ranks), its local and full shapes."""
    out = {}
    for name, p in module.named_parameters():
        spec = partition_info(p)
        full = list(full_shape_of(p)) if spec is not None else list(p.shape)
        out[canonical_name(name, num_layers)] = {"spec": spec, "shape": list(p.shape), "full_shape": full}
    return out


def write_shard_map(engine: Any, ctx: ParallelContext, tag_dir: Path, *, num_layers: int) -> None:
    """This rank's shard map: its coordinates, file names, optimizer parameter order and the split of
    every parameter it holds (`layout/rank_NNNNN.json`; the directory keeps its first name so older
    checkpoints read the same)."""
    stage = int(engine.zero_optimization_stage())
    # ZeRO 1-3 keep flat fp32 partitions in files that name their parameters; ZeRO 0's torch state
    # dict counts them in its groups' order.
    flat = stage > 0
    groups = None
    if not flat:
        names = {id(p): canonical_name(n, num_layers) for n, p in engine.module.named_parameters()}
        groups = [[names[id(p)] for p in g] for g in optimizer_parameter_order(engine)]
    model_file, optim_file = checkpoint_file_names(engine, tag_dir.parent, tag_dir.name, zero_files=flat,
                                                   ep_rank=ctx.ep_rank if ctx.ep > 1 else None)  # fmt: skip
    info = {
        "rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
        "ep_rank": ctx.ep_rank, "ep": ctx.ep, "cp_rank": ctx.cp_rank,
        "zero_stage": stage, "bf16": bool(engine.bfloat16_enabled()),
        # what the engine really runs in (a silent fp32 run would pass a test that reads the config)
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "communication_dtype": str(engine.communication_data_type),
        "model_file": model_file,
        "optim_file": optim_file,
        "groups": groups,
        "params": parameter_splits(engine.module, num_layers),
    }  # fmt: skip
    (tag_dir / SHARD_MAP_DIR).mkdir(parents=True, exist_ok=True)
    (tag_dir / SHARD_MAP_DIR / f"rank_{ctx.rank:05d}.json").write_text(json.dumps(info))


def load_checkpoint(
    engine: Any, tag_dir: Path, cfg: Config, ctx: ParallelContext, *, tokenizer_fingerprint: str | None = None
) -> dict[str, Any]:
    """Loads model, optimizer and scheduler state of a verified tag directory; returns our saved
    state (iteration, consumed samples, ...). A checkpoint of another model (a setting of the model
    section, or the tokenizer, differs) is refused with every difference named. At another layout the
    state is resharded (reshard.py)."""
    meta = read_meta(tag_dir)
    check_same_model(meta, cfg, tag_dir, tokenizer_fingerprint=tokenizer_fingerprint)
    trust = cfg.checkpoint.trust_pickles
    if not trust:  # before DeepSpeed's loader, which unpickles without restriction, sees any file
        check_pickles_distributed(tag_dir, ctx)
    saved = layout_of(meta)
    ours = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "ep": ctx.ep, "cp": ctx.cp,
            "zero": int(engine.zero_optimization_stage())}  # fmt: skip
    _check_islands(meta, tag_dir, ctx, saved == ours)
    if saved != ours:
        return _load_resharded(engine, tag_dir, cfg, ctx, meta, saved, ours)
    try:
        root = island_root(tag_dir.parent, tag_dir, ctx)
        loaded, client = engine.load_checkpoint(str(root), tag=tag_dir.name)
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"checkpoint '{tag_dir}' could not be read ({e}); use an earlier checkpoint"
        ) from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint '{tag_dir}'")
    load_expert_shard(engine.module, ctx, tag_dir, num_layers=cfg.model.num_layers, trust=trust)
    out = dict(client["llm"]) if client and "llm" in client else meta
    rng_file = tag_dir / RNG_DIR / f"rank_{ctx.rank:05d}.pt"
    if rng_file.is_file():  # restored by the caller right before the first step
        out["rng_state"] = load_file(rng_file, trust=trust)
    diloco_file = tag_dir / DILOCO_DIR / f"rank_{ctx.rank:05d}.pt"
    if diloco_file.is_file():
        out["diloco_state"] = load_file(diloco_file, trust=trust)
    return out


def _check_islands(meta: dict[str, Any], tag_dir: Path, ctx: ParallelContext, same_layout: bool) -> None:
    """A DiLoCo checkpoint resumes at its own islands and layout (each island's mid-round weights and
    inner optimizer state are its own); a synchronous one cannot become islands midway either."""
    saved = int(meta.get("diloco_islands", 1))
    if saved == ctx.islands and (saved == 1 or same_layout):
        return
    if saved == ctx.islands:
        raise CheckpointError(
            f"checkpoint '{tag_dir}' was written by {saved} DiLoCo islands at another layout within each island; "
            "resume it with the parallel settings and world size it was saved with"
        )
    raise CheckpointError(
        f"checkpoint '{tag_dir}' was written with parallel.diloco.islands = {saved} and this run has {ctx.islands}: "
        "a run keeps its number of islands; resume with the same value (evaluate.py and convert_to_hf.py read "
        "island 0's weights of any DiLoCo checkpoint)"
    )


def _describe(layout: dict[str, int] | None) -> str:
    if layout is None:
        return "the layout-independent form"
    ep = f" (EP {layout['ep']})" if layout.get("ep", 1) > 1 else ""
    cp = f" x CP {layout['cp']}" if layout.get("cp", 1) > 1 else ""
    return f"TP {layout['tp']} x PP {layout['pp']} x DP {layout['dp']}{cp}{ep}, ZeRO {layout['zero']}"


def _load_resharded(
    engine: Any, tag_dir: Path, cfg: Config, ctx: ParallelContext, meta: dict[str, Any],
    saved: dict[str, int] | None, ours: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    logger.info("resuming %s written at %s as %s: resharding model and optimizer state",
                tag_dir, _describe(saved), _describe(ours))  # fmt: skip
    failed: Exception | None = None
    if ctx.rank == 0:
        try:
            reshard.convert(tag_dir, cfg, meta)
        except CheckpointError as e:
            failed = e
    if ctx.any_rank(failed is not None):
        raise CheckpointError(str(failed or "resharding failed on rank 0; see its message"))
    reshard.load_universal(engine, tag_dir / UNIVERSAL_DIR, cfg, ctx)
    if saved is not None:
        logger.warning(
            "the layout changed: random streams (dropout) restart from the seed; data order is kept"
        )
    return meta
