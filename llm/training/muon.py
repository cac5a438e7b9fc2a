"""Muon (Jordan et al. 2024; Moonlight, Liu et al. 2025) for the hidden weight matrices, AdamW for the rest.

Per hidden 2-D weight W with gradient G (momentum mu, Nesterov by default):

    B = mu B + (1 - mu) G;   U = (1 - mu) G + mu B  (Nesterov) or B
    O = NS(U): the orthogonal factor of U (five quintic Newton-Schulz steps), scaled
        "rms":   0.2 sqrt(max(rows, cols))  (Moonlight: the update's RMS matches AdamW's, so one lr serves both)
        "shape": sqrt(max(1, rows / cols))  (the original)
    W = W (1 - lr wd) - lr O

Embeddings, the output layer, norms and biases step with AdamW (train.lr, adam_beta1/2, adam_eps).

Whole matrices under tensor parallelism: NS(U) is not the shards' NS, so each rank gathers U's shards
over its TP group (`llm.parallel.grads.full_matrix`, in the single-process model's row and column
order), orthogonalizes the whole matrix and keeps its own shard of O: every layout computes what one
process computes (tests/distributed/test_muon.py). A pipeline stage holds whole matrices of its own
layers. The optimizer steps the module's fp32 parameters, so it runs at ZeRO stage 0 in fp32: ZeRO
1-3 and DeepSpeed's bf16 optimizer hand an optimizer flat partitions of the weights, which hold no
matrix (llm.engine.deepspeed_config refuses those combinations in one line).

Why our own and not torch.optim.Muon or DeepSpeed's MuonWithAuxAdam: torch's orthogonalizes the tensor
it holds (a TP shard) and takes 2-D parameters only; DeepSpeed's orthogonalizes inside its ZeRO
partitioning without knowing our tensor-parallel splits. Both would compute another update than the
single-process model under TP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llm.config import TrainConfig
from llm.model.names import canonical_name
from llm.parallel.grads import full_matrix
from llm.parallel.layers import partition_info, shard_by_spec
from llm.parallel.process_groups import ParallelContext

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic iteration of Muon's reference implementation


def newton_schulz(u: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately the orthogonal factor of `u` (U V^T of its SVD U S V^T), in fp32."""
    a, b, c = NS_COEFFICIENTS
    x = u.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def update_scale(rows: int, cols: int, mode: str) -> float:
    return 0.2 * math.sqrt(max(rows, cols)) if mode == "rms" else math.sqrt(max(1.0, rows / cols))


def is_hidden_matrix(name: str, p: torch.Tensor, num_layers: int) -> bool:
    """A 2-D weight inside a transformer block (attention and MLP projections): Muon's."""
    return p.ndim == 2 and canonical_name(name, num_layers).startswith("layers.")


def muon_lr_scale(cfg: TrainConfig) -> float:
    """Muon's rate relative to train.lr (train.muon_lr; the LR schedule scales both alike)."""
    return cfg.muon_lr / cfg.lr if cfg.muon_lr is not None and cfg.lr > 0 else 1.0


def muon_parameter_groups(model: nn.Module, cfg: TrainConfig, num_layers: int) -> list[dict[str, Any]]:
    """[hidden matrices (Muon), other matrices (AdamW, decayed), biases and norms (AdamW, no decay)];
    `lr_scale` is the group's rate relative to train.lr (the LR schedule scales both)."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_hidden_matrix(name, p, num_layers):
            muon.append(p)
        elif p.ndim < 2 or name.endswith(".bias") or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": muon, "weight_decay": cfg.weight_decay, "use_muon": True, "lr_scale": muon_lr_scale(cfg)},
        {"params": decay, "weight_decay": cfg.weight_decay, "use_muon": False},
        {"params": no_decay, "weight_decay": 0.0, "use_muon": False},
    ]


class Muon(torch.optim.Optimizer):
    """Muon for the groups with `use_muon`, AdamW for the others (see the module's docstring)."""

    def __init__(self, params: Any, cfg: TrainConfig, ctx: ParallelContext) -> None:
        defaults = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps,
                    "weight_decay": cfg.weight_decay, "momentum": cfg.muon_momentum, "nesterov": cfg.muon_nesterov,
                    "ns_steps": cfg.muon_ns_steps, "use_muon": False}  # fmt: skip
        super().__init__(params, defaults)
        self.ctx, self.scale_mode = ctx, cfg.muon_scale

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        mu, buf, grad = group["momentum"], state["momentum_buffer"], p.grad
        assert grad is not None
        buf.lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu) if group["nesterov"] else buf
        spec = partition_info(p)
        whole = full_matrix(update, spec, self.ctx)
        rows, cols = whole.shape
        ortho = newton_schulz(whole, group["ns_steps"]) * update_scale(rows, cols, self.scale_mode)
        if whole is not update:
            ortho = shard_by_spec(ortho, spec, rank=self.ctx.tp_rank, size=self.ctx.tp)  # type: ignore[arg-type]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(ortho.to(p.dtype), alpha=-group["lr"])

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
