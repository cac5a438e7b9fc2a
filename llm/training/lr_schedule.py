"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to min_lr, or WSD
(warmup-stable-decay: the rate holds at lr until the last lr_wsd_decay_iters iterations of the decay
length, then falls to min_lr along lr_wsd_decay_style; Megatron's formulas).

Lengths given in iterations are read in the samples those iterations train (`TrainConfig.batch_schedule`):
the same thing at a constant global batch, and under a batch ramp-up a schedule that follows samples
while still ending its warmup and its decay at the iterations named.

Cool-down from any checkpoint: the schedule is a function of the run's config, and a resume applies
the new run's (llm.training.resume.apply_optimizer_settings). Resuming a WSD run's stable-phase
checkpoint with a larger train_iters and the decay length wanted continues at lr and decays to min_lr
at the new end.
"""

from __future__ import annotations

import math

import torch

from llm.config import TrainConfig


def _wsd_factor(progress: float, style: str) -> float:
    """The fraction of (lr - min_lr) left after `progress` (0..1) of WSD's decay phase."""
    if style == "linear":
        return 1.0 - progress
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "exponential":
        return 2.0 * 0.5**progress - 1.0
    return 1.0 - math.sqrt(progress)  # minus_sqrt


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """The learning rate of 0-based iteration `iteration`."""
    batches = cfg.batch_schedule
    trained = batches.samples_before(iteration)
    warmup = batches.samples_before(cfg.lr_warmup_iters)
    if cfg.lr_warmup_iters > 0 and iteration < cfg.lr_warmup_iters:
        return cfg.lr * (trained + batches.size_of(iteration)) / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    end = batches.samples_before(cfg.decay_iters)
    if cfg.lr_decay_style == "WSD":
        start = batches.samples_before(cfg.decay_iters - cfg.wsd_decay_iters)
        progress = min(1.0, max(0.0, (trained - start) / max(1, end - start)))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * _wsd_factor(progress, cfg.lr_wsd_decay_style)
    progress = min(1.0, max(0.0, (trained - warmup) / max(1, end - warmup)))
    if cfg.lr_decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def make_scheduler(cfg: TrainConfig):  # -> Callable[[Optimizer], LambdaLR]
    """A callable for `deepspeed.initialize(lr_scheduler=...)`; DeepSpeed steps it once per optimizer step."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        base = cfg.lr if cfg.lr > 0 else 1.0
        for group in optimizer.param_groups:  # a group's lr_scale: its rate relative to train.lr (Muon's)
            group["lr"] = group["initial_lr"] = base * group.get("lr_scale", 1.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_at(it, cfg) / base)

    return build
