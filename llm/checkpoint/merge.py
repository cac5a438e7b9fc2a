"""Full (unsharded) model weights of a checkpoint of any layout, without DeepSpeed's engine: for
evaluation, generation and export.

Tensor-parallel shards are merged with the split each parameter was saved with (the rank layout
files, `format.parameter_specs`), pipeline layer files are mapped back to the plain model's names,
expert shards are joined along the expert dimension (experts.py), ZeRO-3 partitions are gathered by
DeepSpeed's own zero_to_fp32, and an imported checkpoint is read from its universal form.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint.experts import merge_expert_shards
from llm.checkpoint.format import (
    UNIVERSAL_DIR,
    CheckpointError,
    config_from_meta,
    is_universal_only,
    parameter_specs,
    read_meta,
    read_shard_maps,
    resolve_checkpoint,
    verify_checkpoint,
)
from llm.checkpoint.pickles import check_files, load_file, pickled_files
from llm.config import Config, replace_validated
from llm.engine.zero import zero3_fp32_state_dict
from llm.model.gpt import GPT
from llm.model.names import canonical_name, canonical_prefix
from llm.parallel.layers import merge_by_spec

Tensors = dict[str, torch.Tensor]


def load_tensor_file(file: Path, *, trust: bool = False) -> Any:
    """torch.load of one checkpoint file, restricted to the types checkpoints hold (pickles.py; `trust`:
    unrestricted); a missing or unreadable file is a CheckpointError naming it."""
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint file '{file}' is missing: the checkpoint is incomplete; use an earlier one"
        )
    try:
        return load_file(file, trust=trust)
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"checkpoint file '{file}' is damaged ({e}); use an earlier checkpoint"
        ) from None


def fit_vocab_rows(state: Tensors, rows: int) -> Tensors:
    """Vocabulary padding depends on the TP size it was trained at; padded rows carry no meaning,
    so they are trimmed or zero-filled to this layout's padded size."""
    out = dict(state)
    for name in ("embed.weight", "lm_head.weight"):
        if name in out and out[name].shape[0] != rows:
            w = out[name]
            out[name] = (
                w[:rows] if w.shape[0] > rows else torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
            )
    return out


def _read_model_file(file: Path, *, trust: bool) -> Tensors:
    sd = load_tensor_file(file, trust=trust)
    if "module" not in sd:
        raise CheckpointError(f"model file '{file}' holds no model weights; use an earlier checkpoint")
    return dict(sd["module"])


def _read_pipeline_layers(tag_dir: Path, tp_rank: int, num_layers: int, *, trust: bool) -> Tensors:
    """DeepSpeed's per-layer files of one tensor-parallel rank -> plain-model names."""
    files = sorted(tag_dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt"))
    if not files:
        raise CheckpointError(f"no pipeline layer files for tensor-parallel rank {tp_rank} in '{tag_dir}'")
    state: Tensors = {}
    for file in files:
        idx = int(file.name.split("-")[0].removeprefix("layer_"))
        prefix = canonical_prefix(idx, num_layers)
        for k, v in load_tensor_file(
            file, trust=trust
        ).items():  # the first stage's copy of the tied embedding wins
            state.setdefault(prefix + k, v)
    return state


def _read_pipeline_stages(tag_dir: Path, tp_rank: int, num_layers: int, *, trust: bool) -> Tensors:
    """A pipeline with expert parallelism: DeepSpeed writes each stage's module into the model file of
    its first data-parallel rank (named in the shard maps) instead of per-layer files -> plain-model
    names (the experts there are expert-parallel rank 0's; `merge_expert_shards` adds the others)."""
    infos = sorted((i for i in read_shard_maps(tag_dir) if i["tp_rank"] == tp_rank and i["dp_rank"] == 0),
                   key=lambda i: i["pp_rank"])  # fmt: skip
    state: Tensors = {}
    for info in infos:  # the first stage's copy of the tied embedding wins
        for k, v in _read_model_file(tag_dir / info["model_file"], trust=trust).items():
            state.setdefault(canonical_name(k, num_layers), v)
    return state


def merge_tensor_parallel(shards: list[Tensors], specs: dict[str, dict[str, Any] | None]) -> Tensors:
    """Tensor-parallel shards (in TP-rank order) -> full tensors; replicated ones are taken from rank 0."""
    if len(shards) == 1:
        return shards[0]
    out = {}
    for name, value in shards[0].items():
        spec = specs.get(name)
        out[name] = value if spec is None else merge_by_spec([s[name] for s in shards], spec)
    return out


def read_universal_weights(tag_dir: Path, *, trust: bool = False) -> Tensors:
    files = sorted((tag_dir / UNIVERSAL_DIR).glob("*.pt"))
    return {f.stem: load_tensor_file(f, trust=trust)["fp32"] for f in files if f.name != "state.pt"}


def load_model_state(
    path: str | Path, *, verify: bool = True, trust_pickles: bool = False
) -> tuple[Config, Tensors, dict[str, Any]]:
    """Full (unsharded) fp32 model weights of a checkpoint: (config, state, meta). With `verify`, every
    file is first checked against the MANIFEST's sizes and checksums (a damaged one is named). Files
    are unpickled only as pickles.py allows, unless `trust_pickles`."""
    tag_dir = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(tag_dir)
    trust = trust_pickles
    meta = read_meta(tag_dir)
    cfg = config_from_meta(meta, source=str(tag_dir))
    tp, pp = int(meta.get("tensor_parallel", 1)), int(meta.get("pipeline_parallel", 1))
    if is_universal_only(meta):
        state = read_universal_weights(tag_dir, trust=trust)
    elif int(meta.get("zero_stage", 0)) == 3:  # no tensor parallelism with ZeRO 3 (config check)
        if not trust:  # DeepSpeed's reader unpickles without restriction: every file is checked first
            check_files(pickled_files(tag_dir))
        state = zero3_fp32_state_dict(tag_dir)
    else:
        if pp > 1 and int(meta.get("expert_parallel", 1)) > 1:  # DeepSpeed's MoE save: one file per stage
            shards = [_read_pipeline_stages(tag_dir, r, cfg.model.num_layers, trust=trust) for r in range(tp)]
        elif pp > 1:
            shards = [_read_pipeline_layers(tag_dir, r, cfg.model.num_layers, trust=trust) for r in range(tp)]
        else:
            shards = [
                _read_model_file(tag_dir / f"mp_rank_{r:02d}_model_states.pt", trust=trust) for r in range(tp)
            ]
        specs = parameter_specs(read_shard_maps(tag_dir)) if tp > 1 else {}
        state = merge_tensor_parallel(shards, specs)
        state = merge_expert_shards(tag_dir, state, ep=int(meta.get("expert_parallel", 1)), trust=trust)
    return cfg, {k: v.float() for k, v in state.items()}, meta


def load_trained_model(
    checkpoint: str | Path, *, device: str = "cpu", verify: bool = True, trust_pickles: bool = False
) -> tuple[Config, GPT]:
    """The checkpoint's model as one plain GPT in one process (evaluation, generation), in eval mode.
    Eager even when it trained with model.compile (a training speed setting): compiling for every new
    shape of decoding made generation 8x slower and evaluation 1.6x slower on CPU, and changed the
    perplexity's last digits against the same checkpoint trained eagerly."""
    cfg, state, _ = load_model_state(checkpoint, verify=verify, trust_pickles=trust_pickles)
    cfg = replace_validated(  # one process: no tensor or pipeline parallelism
        cfg,
        model=dataclasses.replace(cfg.model, sequence_parallel=False, compile=False),
        parallel=dataclasses.replace(
            cfg.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1
        ),
    )
    model = GPT(cfg.model)
    state = fit_vocab_rows(state, model.embed.weight.shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{checkpoint}' does not match its model config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): it was written by another version or is damaged"
        )
    return cfg, model.to(device).eval()
