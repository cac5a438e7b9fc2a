"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to min_lr."""

from __future__ import annotations

import math

import torch

from llm.config import TrainConfig


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """The learning rate of 0-based iteration `iteration`."""
    if cfg.lr_warmup_iters > 0 and iteration < cfg.lr_warmup_iters:
        return cfg.lr * (iteration + 1) / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    span = max(1, cfg.decay_iters - cfg.lr_warmup_iters)
    progress = min(1.0, max(0.0, (iteration - cfg.lr_warmup_iters) / span))
    if cfg.lr_decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def make_scheduler(cfg: TrainConfig):  # -> Callable[[Optimizer], LambdaLR]
    """A callable for `deepspeed.initialize(lr_scheduler=...)`; DeepSpeed steps it once per optimizer step."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        base = cfg.lr if cfg.lr > 0 else 1.0
        for group in optimizer.param_groups:
            group["lr"] = base
            group["initial_lr"] = base
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, cfg) / base)

    return build
