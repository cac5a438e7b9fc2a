"""Saving and loading through a DeepSpeed engine: DeepSpeed's own files plus ours (meta, per-rank
RNG streams and layouts, MANIFEST, `latest`), and resuming at another layout through reshard.py."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint import reshard
from llm.checkpoint.compat import require_tested_deepspeed
from llm.checkpoint.format import (
    LAYOUT_DIR,
    MANIFEST,
    RNG_DIR,
    UNIVERSAL_DIR,
    CheckpointError,
    build_meta,
    layout_of,
    prune,
    read_meta,
    set_latest,
    tag_for,
    write_manifest,
    write_meta,
)
from llm.checkpoint.rng import rng_state
from llm.config import Config
from llm.model.pipeline import canonical_name
from llm.parallel.context import ParallelContext
from llm.parallel.layers import full_shape_of, partition_info

require_tested_deepspeed()  # this module reads DeepSpeed's private internals
logger = logging.getLogger("llm")


def save_checkpoint(engine: Any, cfg: Config, state: dict[str, Any], *, ctx: ParallelContext) -> Path:
    """Saves through DeepSpeed (every rank); the checkpoint becomes visible only when all ranks are done.

    Order: llm_meta.json, per-rank RNG and layout files, DeepSpeed's files; a barrier; then rank 0
    writes MANIFEST (every file and its size) and finally moves `latest` (atomic rename). A process
    killed anywhere before that leaves `latest` on the previous checkpoint.
    """
    directory, rank = Path(cfg.checkpoint_dir), ctx.rank
    tag = tag_for(int(state["iteration"]))
    tag_dir = directory / tag
    meta = build_meta(state, cfg, zero_stage=int(engine.zero_optimization_stage()), world_size=ctx.world_size)
    if rank == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / MANIFEST).unlink(missing_ok=True)  # a re-save of the same tag is incomplete until done
        shutil.rmtree(tag_dir / UNIVERSAL_DIR, ignore_errors=True)
        write_meta(tag_dir, meta)
    ctx.barrier()
    (tag_dir / RNG_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(getattr(engine.module, "rng", None)), tag_dir / RNG_DIR / f"rank_{rank:05d}.pt")
    write_rank_layout(engine, ctx, tag_dir, num_layers=cfg.model.num_layers)
    engine.save_checkpoint(str(directory), tag=tag, client_state={"llm": meta}, save_latest=False)
    ctx.barrier()  # DeepSpeed's own `latest` would not wait for the other ranks' files
    if rank == 0:
        write_manifest(tag_dir)
        set_latest(directory, tag)
        if cfg.checkpoint.keep_last:
            prune(directory, cfg.checkpoint.keep_last, keep=tag)
    ctx.barrier()
    return tag_dir


def parameter_layout(module: torch.nn.Module, num_layers: int) -> dict[str, dict[str, Any]]:
    """Plain-model name -> how this rank holds the parameter: its tensor-parallel split (the layer's
    own `partition_info`: dimension and stride, or the grouped-QKV layout with KV rows shared by
    several ranks), its local and full shapes."""
    out = {}
    for name, p in module.named_parameters():
        spec = partition_info(p)
        full = list(full_shape_of(p)) if spec is not None else list(p.shape)
        out[canonical_name(name, num_layers)] = {"spec": spec, "shape": list(p.shape), "full_shape": full}
    return out


def write_rank_layout(engine: Any, ctx: ParallelContext, tag_dir: Path, *, num_layers: int) -> None:
    """This rank's coordinates, file names, optimizer parameter order and parameter layouts."""
    stage = int(engine.zero_optimization_stage())
    groups = None  # ZeRO 1-3 files name their parameters; ZeRO 0's torch state dict counts them
    if stage == 0:
        names = {id(p): canonical_name(n, num_layers) for n, p in engine.module.named_parameters()}
        groups = [[names[id(p)] for p in g["params"]] for g in engine.optimizer.param_groups]
    info = {
        "rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank,
        "zero_stage": stage, "bf16": bool(engine.bfloat16_enabled()),
        "model_file": Path(engine._get_ckpt_name(str(tag_dir.parent), tag_dir.name)).name,
        "optim_file": Path(engine._get_zero_ckpt_name(str(tag_dir.parent), tag_dir.name)).name if stage else None,
        "groups": groups,
        "params": parameter_layout(engine.module, num_layers),
    }  # fmt: skip
    (tag_dir / LAYOUT_DIR).mkdir(parents=True, exist_ok=True)
    (tag_dir / LAYOUT_DIR / f"rank_{ctx.rank:05d}.json").write_text(json.dumps(info))


def load_checkpoint(engine: Any, tag_dir: Path, cfg: Config, ctx: ParallelContext) -> dict[str, Any]:
    """Loads model, optimizer and scheduler state of a verified tag directory; returns our saved
    state (iteration, consumed samples, ...). At another layout the state is resharded (reshard.py)."""
    meta = read_meta(tag_dir)
    saved = layout_of(meta)
    ours = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "zero": int(engine.zero_optimization_stage())}
    if saved != ours:
        return _load_resharded(engine, tag_dir, cfg, ctx, meta, saved, ours)
    try:
        loaded, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint '{tag_dir}' could not be read ({e}); use an earlier checkpoint") from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint '{tag_dir}'")
    out = dict(client["llm"]) if client and "llm" in client else meta
    rng_file = tag_dir / RNG_DIR / f"rank_{ctx.rank:05d}.pt"
    if rng_file.is_file():  # restored by the caller right before the first step
        out["rng_state"] = torch.load(rng_file, weights_only=False)
    return out


def _describe(layout: dict[str, int] | None) -> str:
    if layout is None:
        return "the layout-independent form"
    return "TP {tp} x PP {pp} x DP {dp}, ZeRO {zero}".format(**layout)


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
        logger.warning("the layout changed: random streams (dropout) restart from the seed; data order is kept")
    return meta
