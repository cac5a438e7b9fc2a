"""The GPT model: one definition for the `gpt2` and `llama` presets.

gpt2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings.
llama: rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases, untied embeddings.

The vocabulary is padded (ModelConfig.padded_vocab_size); logits of padded ids are never part of
the loss or of a sampling distribution (`logits` returns only the real vocabulary).

Initialization is independent of the parallel layout: every parameter is drawn from its own
generator, seeded by (seed, parameter name), so the same seed gives the same full weights whatever
the layout and whatever the order of construction.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.config import ModelConfig
from llm.model.layers import KVCache, TransformerBlock, make_norm, output_init_std

_OUTPUT_PROJECTIONS = ("attention.proj.weight", "mlp.proj.weight")


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = int(cfg.vocab_size or 0)
        padded = cfg.padded_vocab_size()
        self.embed = nn.Embedding(padded, cfg.hidden_size)
        self.pos_embed = None if cfg.is_llama else nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = None if cfg.tied else nn.Linear(cfg.hidden_size, padded, bias=False)
        self.activation_checkpointing = cfg.activation_checkpointing

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(
        self, input_ids: torch.Tensor, *, offset: int = 0, caches: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, list[KVCache] | None]:
        x = self.embed(input_ids)  # (B, S, H)
        if self.pos_embed is not None:
            positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
            x = x + self.pos_embed(positions)
        x = self.embed_dropout(x)
        new_caches: list[KVCache] | None = [] if caches is not None else None
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and caches is None:
                x, _ = checkpoint(layer, x, use_reentrant=False)
                continue
            x, c = layer(x, offset=offset, cache=caches[i] if caches is not None else None)
            if new_caches is not None and c is not None:
                new_caches.append(c)
        return self.final_norm(x), new_caches

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (padding dropped): (B, S, H) -> (B, S, V)."""
        return F.linear(hidden, self.output_weight()[: self.vocab_size])

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token cross-entropy when `labels` is given, else logits (B, S, V)."""
        hidden, _ = self.hidden_states(input_ids)
        logits = self.logits(hidden)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def forward_batch(self, tokens: torch.Tensor) -> torch.Tensor:
        """A (B, S + 1) token batch -> loss over inputs tokens[:, :-1] and labels tokens[:, 1:]."""
        return self(tokens[:, :-1], tokens[:, 1:])


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_full_parameter(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of a parameter, from its name alone."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if "norm" in name:
        return torch.ones(shape)
    std = output_init_std(cfg) if name.endswith(_OUTPUT_PROJECTIONS) else cfg.init_std
    gen = torch.Generator().manual_seed(_param_seed(seed, name))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    for name, p in model.named_parameters():
        p.copy_(init_full_parameter(name, p.shape, cfg, seed).to(p.dtype))


def build_model(cfg: ModelConfig, *, seed: int) -> GPT:
    model = GPT(cfg)
    init_weights(model, cfg, seed)
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms and 1-d parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
