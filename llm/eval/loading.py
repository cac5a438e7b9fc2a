"""Loading a trained model (any ZeRO stage) and its tokenizer for evaluation and generation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llm.config import Config, ConfigError
from llm.data.tokenizer import REPO_ROOT, load_tokenizer
from llm.model.gpt import GPT
from llm.parallel.context import ParallelContext, init_distributed
from llm.parallel.launcher import detect_launch
from llm.training.checkpoint import CheckpointError, load_model_state


def load_trained_model(checkpoint: str | Path, *, device: str = "cpu") -> tuple[Config, GPT]:
    cfg, state, _ = load_model_state(checkpoint)
    cfg.model.sequence_parallel = False  # one process: no tensor parallelism
    model = GPT(cfg.model)
    state = fit_vocab_rows(state, model.embed.weight.shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{checkpoint}' does not match its model config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): it was written by another version or is damaged"
        )
    return cfg, model.to(device).eval()


def tokenizer_for(cfg: Config, override: str | None = None) -> Any:
    """The run's tokenizer; a relative path is tried from the working directory, then the repo root."""
    spec = override or cfg.data.tokenizer
    if spec is None:
        raise ConfigError("the checkpoint's config names no tokenizer: pass --tokenizer")
    if not Path(spec).exists() and (REPO_ROOT / spec).exists():
        spec = str(REPO_ROOT / spec)
    return load_tokenizer(spec)


def default_device() -> str:
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def eval_context() -> ParallelContext:
    """One process, or every process a launcher started (torchrun, deepspeed, srun): evaluation
    is then data-parallel (a full model per process)."""
    if detect_launch().world_size > 1:
        init_distributed()
        return ParallelContext.build(tp=1, pp=1)
    return ParallelContext(world_size=1, rank=0)


def fit_vocab_rows(state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
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
