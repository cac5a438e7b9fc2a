"""Checkpoints through DeepSpeed, plus a small `llm_meta.json` that tools read without torch.load.

Layout of `checkpoint.dir`:

    latest                      tag of the newest complete checkpoint (written last, atomically)
    iter_0000100/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files
        llm_meta.json           iteration, consumed samples, our effective config, layout, ...
        rng/rank_NNNNN.pt       every random stream of each rank
        layout/rank_NNNNN.json  each rank's coordinates and files (for resuming at another layout)
        MANIFEST.json           every file and its size, written when all ranks are done
        universal/              full per-parameter state, made on the first resume at another layout
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm.config import Config, _build
from llm.model.gpt import partition_spec_for
from llm.parallel.layers import merge_by_spec

logger = logging.getLogger("llm")
META = "llm_meta.json"
MANIFEST = "MANIFEST.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; the message names the file."""


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_tag(directory: str | Path) -> str | None:
    f = Path(directory) / "latest"
    return f.read_text().strip() if f.is_file() else None


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
            f"'{p}' holds no checkpoint (no 'latest' file and no {META}); pass a checkpoint directory"
        )
    if not (p / tag / META).is_file():
        raise CheckpointError(
            f"checkpoint '{p / tag}' named by '{p / 'latest'}' is missing or incomplete ({META} absent)"
        )
    return p / tag


def read_meta(tag_dir: str | Path) -> dict[str, Any]:
    path = Path(tag_dir) / META
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read '{path}': {e}") from None


def config_from_meta(meta: dict[str, Any]) -> Config:
    cfg: Config = _build(Config, meta["config"], "")
    return cfg


def save_checkpoint(engine: Any, cfg: Config, state: dict[str, Any], *, ctx: Any) -> Path:
    """Saves through DeepSpeed (every rank); the checkpoint becomes visible only when all ranks are done.

    Order: llm_meta.json, per-rank RNG and layout files, DeepSpeed's files; a barrier; then rank 0
    writes MANIFEST (every file and its size) and finally moves `latest` (atomic rename). A process
    killed anywhere before that leaves `latest` on the previous checkpoint.
    """
    from llm.training.reshard import write_layout

    directory, rank = Path(cfg.checkpoint_dir), ctx.rank
    tag = tag_for(int(state["iteration"]))
    tag_dir = directory / tag
    meta = dict(
        state,
        config=cfg.to_dict(),
        zero_stage=int(engine.zero_optimization_stage()),
        tensor_parallel=cfg.parallel.tensor_model_parallel_size,
        pipeline_parallel=cfg.parallel.pipeline_model_parallel_size,
        world_size=ctx.world_size,
    )
    if rank == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / MANIFEST).unlink(missing_ok=True)  # a re-save of the same tag is incomplete until done
        shutil.rmtree(tag_dir / "universal", ignore_errors=True)
        (tag_dir / META).write_text(json.dumps(meta, indent=1))
    ctx.barrier()
    (tag_dir / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(getattr(engine.module, "rng", None)), tag_dir / "rng" / f"rank_{rank:05d}.pt")
    write_layout(engine, ctx, tag_dir, rank=rank, num_layers=cfg.model.num_layers)
    engine.save_checkpoint(str(directory), tag=tag, client_state={"llm": meta}, save_latest=False)
    ctx.barrier()  # DeepSpeed's own `latest` would not wait for the other ranks' files
    if rank == 0:
        write_manifest(tag_dir)
        _atomic_write(directory / "latest", tag)
        if cfg.checkpoint.keep_last:
            _prune(directory, cfg.checkpoint.keep_last, keep=tag)
    ctx.barrier()
    return tag_dir


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(tag_dir: Path) -> None:
    files = {
        str(f.relative_to(tag_dir)): f.stat().st_size
        for f in sorted(tag_dir.rglob("*"))
        if f.is_file() and f.name != MANIFEST and not f.relative_to(tag_dir).parts[0].startswith("universal")
    }
    _atomic_write(tag_dir / MANIFEST, json.dumps(files, indent=0))


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


def complete_tags(directory: Path) -> list[Path]:
    """Checkpoints with a MANIFEST, newest first (the one `latest` names comes first)."""
    tags = sorted((p for p in directory.glob("iter_*") if (p / MANIFEST).is_file()), reverse=True)
    named = latest_tag(directory)
    return sorted(tags, key=lambda p: p.name != named)


def _prune(directory: Path, keep_last: int, *, keep: str) -> None:
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


def load_checkpoint(engine: Any, tag_dir: Path, cfg: Config, ctx: Any) -> dict[str, Any]:
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
    rng_file = tag_dir / "rng" / f"rank_{ctx.rank:05d}.pt"
    if rng_file.is_file():  # restored by the caller right before the first step
        out["rng_state"] = torch.load(rng_file, weights_only=False)
    return out


def layout_of(meta: dict[str, Any]) -> dict[str, int]:
    tp, pp = int(meta.get("tensor_parallel", 1)), int(meta.get("pipeline_parallel", 1))
    return {"tp": tp, "pp": pp, "dp": int(meta.get("world_size", tp * pp)) // (tp * pp),
            "zero": int(meta.get("zero_stage", 0))}  # fmt: skip


def _load_resharded(
    engine: Any, tag_dir: Path, cfg: Config, ctx: Any, meta: dict[str, Any], saved: dict, ours: dict
) -> dict[str, Any]:
    from llm.training import reshard

    describe = "TP {tp} x PP {pp} x DP {dp}, ZeRO {zero}".format
    logger.info("resuming %s written at %s as %s: resharding model and optimizer state",
                tag_dir, describe(**saved), describe(**ours))  # fmt: skip
    failed: Exception | None = None
    if ctx.rank == 0:
        try:
            reshard.convert(tag_dir, cfg, meta)
        except (CheckpointError, reshard.ReshardError) as e:
            failed = e
    if ctx.any_rank(failed is not None):
        raise CheckpointError(str(failed or "resharding failed on rank 0; see its message"))
    reshard.load_universal(engine, tag_dir / reshard.UNIVERSAL_DIR, cfg, ctx)
    logger.warning("the layout changed: random streams (dropout) restart from the seed; data order is kept")
    return meta


def load_model_state(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) model weights of a checkpoint, without DeepSpeed's engine: (config, state, meta)."""
    tag_dir = resolve_checkpoint(path)
    meta = read_meta(tag_dir)
    cfg = config_from_meta(meta)
    tp, pp = int(meta.get("tensor_parallel", 1)), int(meta.get("pipeline_parallel", 1))
    if "imported_from" in meta:  # scripts/convert_to_hf.py --import: only the layout-independent form
        files = sorted((tag_dir / "universal").glob("*.pt"))
        state = {f.stem: torch.load(f, weights_only=False)["fp32"] for f in files if f.name != "state.pt"}
    elif int(meta.get("zero_stage", 0)) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    elif pp > 1:
        shards = [_read_pipeline_layers(tag_dir, r, cfg.model.num_layers) for r in range(tp)]
        state = _merge_tensor_parallel(shards, cfg, tp)
    else:
        shards = [_read_model_file(tag_dir / f"mp_rank_{r:02d}_model_states.pt") for r in range(tp)]
        state = _merge_tensor_parallel(shards, cfg, tp)
    return cfg, {k: v.float() for k, v in state.items()}, meta


def _read_model_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"model file '{file}' is missing: the checkpoint is incomplete")
    try:
        return dict(torch.load(file, map_location="cpu", weights_only=False)["module"])
    except (RuntimeError, EOFError, KeyError, OSError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"model file '{file}' is damaged ({e}); use an earlier checkpoint") from None


def _read_pipeline_layers(tag_dir: Path, tp_rank: int, num_layers: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's per-layer files of one tensor-parallel rank -> plain-model names."""
    from llm.model.pipeline import canonical_prefix

    files = sorted(tag_dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt"))
    if not files:
        raise CheckpointError(f"no pipeline layer files for tensor-parallel rank {tp_rank} in '{tag_dir}'")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        idx = int(file.name.split("-")[0].removeprefix("layer_"))
        try:
            layer = torch.load(file, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise CheckpointError(
                f"model file '{file}' is damaged ({e}); use an earlier checkpoint"
            ) from None
        prefix = canonical_prefix(idx, num_layers)
        for k, v in layer.items():  # the first stage's copy of the tied embedding module wins
            state.setdefault(prefix + k, v)
    return state


def _merge_tensor_parallel(
    shards: list[dict[str, torch.Tensor]], cfg: Config, tp: int
) -> dict[str, torch.Tensor]:
    """Tensor-parallel shards -> full tensors (replicated parameters are taken from rank 0)."""
    if len(shards) == 1:
        return shards[0]
    out = {}
    for name, value in shards[0].items():
        spec = partition_spec_for(name, cfg.model, tp)
        out[name] = value if spec is None else merge_by_spec([s[name] for s in shards], spec)
    return out


def rng_state(tracker: Any) -> dict[str, Any]:
    """Every random stream of this process: python, numpy, torch (CPU, CUDA), the TP tracker."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tracker.get_states() if tracker is not None else {},
    }


def restore_rng_state(state: dict[str, Any], tracker: Any) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and state.get("tracker"):
        tracker.set_states(state["tracker"])
