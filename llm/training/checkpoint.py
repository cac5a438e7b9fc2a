"""Checkpoints through DeepSpeed, plus a small `llm_meta.json` that tools read without torch.load.

Layout of `checkpoint.dir`:

    latest                      tag of the newest complete checkpoint (written last, by DeepSpeed)
    iter_0000100/
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files
        llm_meta.json           iteration, consumed samples, our effective config, ZeRO stage, ...
"""

from __future__ import annotations

import json
import logging
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


def save_checkpoint(engine: Any, cfg: Config, state: dict[str, Any], *, rank: int) -> Path:
    """Saves through DeepSpeed (every rank) and writes llm_meta.json (rank 0)."""
    directory = Path(cfg.checkpoint_dir)
    tag = tag_for(int(state["iteration"]))
    meta = dict(
        state,
        config=cfg.to_dict(),
        zero_stage=int(engine.zero_optimization_stage()),
        tensor_parallel=cfg.parallel.tensor_model_parallel_size,
        pipeline_parallel=cfg.parallel.pipeline_model_parallel_size,
        world_size=dist_world_size(),
    )
    # DeepSpeed writes `latest` after all ranks saved; write meta first so `latest` never names a
    # checkpoint without it.
    if rank == 0:
        (directory / tag).mkdir(parents=True, exist_ok=True)
        (directory / tag / META).write_text(json.dumps(meta, indent=1))
    rng = getattr(engine.module, "rng", None)
    (directory / tag / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(rng), directory / tag / "rng" / f"rank_{rank:05d}.pt")
    engine.save_checkpoint(str(directory), tag=tag, client_state={"llm": meta})
    if rank == 0 and cfg.checkpoint.keep_last:
        _prune(directory, cfg.checkpoint.keep_last, keep=tag)
    return directory / tag


def _prune(directory: Path, keep_last: int, *, keep: str) -> None:
    tags = sorted(p for p in directory.glob("iter_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: Any, path: str | Path, cfg: Config) -> dict[str, Any]:
    """Loads model, optimizer and scheduler state; returns our saved state (iteration, ...)."""
    tag_dir = resolve_checkpoint(path)
    meta = read_meta(tag_dir)
    saved = (int(meta.get("tensor_parallel", 1)), int(meta.get("pipeline_parallel", 1)))
    ours = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    if saved != ours:
        raise CheckpointError(
            f"checkpoint '{tag_dir}' was written at TP {saved[0]} x PP {saved[1]}, this run is TP {ours[0]} x "
            f"PP {ours[1]}: resuming at another tensor/pipeline layout is not supported yet; resume with the saved "
            "layout, or start fresh with checkpoint.resume=none (evaluate.py reads checkpoints of any layout)"
        )
    loaded, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint '{tag_dir}'")
    rng_file = tag_dir / "rng" / f"rank_{dist_rank():05d}.pt"
    if rng_file.is_file() and int(meta.get("world_size", -1)) == dist_world_size():
        restore_rng_state(torch.load(rng_file, weights_only=False), getattr(engine.module, "rng", None))
    else:
        logger.warning(
            "checkpoint %s has no RNG state for this rank/world size; random streams restart", tag_dir
        )
    return dict(client["llm"]) if client and "llm" in client else meta


def load_model_state(path: str | Path) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) model weights of a checkpoint, without DeepSpeed's engine: (config, state, meta)."""
    tag_dir = resolve_checkpoint(path)
    meta = read_meta(tag_dir)
    cfg = config_from_meta(meta)
    tp, pp = int(meta.get("tensor_parallel", 1)), int(meta.get("pipeline_parallel", 1))
    if int(meta.get("zero_stage", 0)) == 3:
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
        state.update({prefix + k: v for k, v in layer.items()})
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


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def dist_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


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
