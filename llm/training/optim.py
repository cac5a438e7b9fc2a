"""AdamW (or SGD) with layout-aware global-norm clipping, for the one case DeepSpeed gets wrong.

With pipeline parallelism and ZeRO stage 0, DeepSpeed's fp32 clipping counts only the first
stage's replicated parameters, so the clipping norm is not the model's norm. There we hand
DeepSpeed this optimizer and set its own clipping to 0: `step()` computes the norm over every
stage and tensor-parallel shard exactly once (llm.parallel.grads) and clips before AdamW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from llm.config import TrainConfig
from llm.parallel.grads import global_grad_norm
from llm.parallel.process_groups import ParallelContext
from llm.training.muon import Muon


class _ClipsGlobalNorm(torch.optim.Optimizer):
    """Clips at the global norm before the step, on the device: no host synchronisation (the norm
    stays a tensor, `last_grad_norm`, read when the trainer logs it)."""

    ctx: ParallelContext
    max_norm: float
    last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"]]
        norm = global_grad_norm(params, self.ctx)
        self.last_grad_norm = norm
        if self.max_norm > 0:  # grads x min(1, max_norm / (norm + 1e-6)), as torch's clip_grad_norm_
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return super().step(closure)


class ClippedAdamW(_ClipsGlobalNorm, torch.optim.AdamW):
    def __init__(self, params: Any, cfg: TrainConfig, ctx: ParallelContext) -> None:
        super().__init__(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                         weight_decay=cfg.weight_decay)  # fmt: skip
        self.ctx, self.max_norm = ctx, cfg.clip_grad


class ClippedSGD(_ClipsGlobalNorm, torch.optim.SGD):
    def __init__(self, params: Any, cfg: TrainConfig, ctx: ParallelContext) -> None:
        super().__init__(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        self.ctx, self.max_norm = ctx, cfg.clip_grad


class ClippedMuon(_ClipsGlobalNorm, Muon):
    def __init__(self, params: Any, cfg: TrainConfig, ctx: ParallelContext) -> None:
        super().__init__(params, cfg, ctx)
        self.max_norm = cfg.clip_grad


def clipped_optimizer(params: Any, cfg: TrainConfig, ctx: ParallelContext) -> torch.optim.Optimizer:
    """train.optimizer with global-norm clipping (llm.parallel.grads)."""
    kinds = {"sgd": ClippedSGD, "muon": ClippedMuon, "adamw": ClippedAdamW}
    return kinds[cfg.optimizer](params, cfg, ctx)
