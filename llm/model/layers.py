"""Transformer building blocks: norms, rotary embeddings, attention, MLP, the block.

Parameter layouts are chosen so that tensor parallelism can split them along their first
dimension without reordering:

- `attention.qkv.weight` ((nq + 2 nkv) d, h): grouped, for each KV group g the rows are
  [q heads of g (nq / nkv heads) | k_g | v_g], each head d rows.
- `mlp.fc.weight` (llama: (2 f, h)): [gate | up].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.is_llama:
        return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embeddings in the rotate-half convention (as Hugging Face Llama)."""

    def __init__(self, head_dim: int, *, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (P, d)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        # x: (B, heads, S, d)
        seq = x.shape[-2]
        if offset + seq > self.cos.shape[0]:
            raise ValueError(
                f"position {offset + seq} exceeds the rotary table ({self.cos.shape[0]} positions)"
            )
        cos = self.cos[offset : offset + seq].to(x.dtype)  # (S, d)
        sin = self.sin[offset : offset + seq].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.kv_groups
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        bias = not cfg.is_llama
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, qkv_out, bias=bias)
        self.proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.rotary = (
            Rotary(self.head_dim, max_positions=cfg.max_positions, theta=cfg.rope_theta)
            if cfg.is_llama
            else None
        )

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = qkv.shape
        per_group = self.num_heads // self.num_groups
        qkv = qkv.view(b, s, self.num_groups, per_group + 2, self.head_dim)  # (B, S, g, q/g + 2, d)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.num_heads, self.head_dim)  # (B, S, nq, d)
        k = qkv[:, :, :, per_group]  # (B, S, g, d)
        v = qkv[:, :, :, per_group + 1]  # (B, S, g, d)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, d)

    def forward(
        self, x: torch.Tensor, *, offset: int = 0, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        b, s, _ = x.shape  # (B, S, H)
        q, k, v = self._split_qkv(self.qkv(x))
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        new_cache: KVCache | None = None
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)  # (B, g, past + S, d)
            v = torch.cat([cache[1], v], dim=2)
            new_cache = (k, v)
        mask = None
        causal = cache is None or cache[0].shape[2] == 0
        if not causal and s > 1:
            total = k.shape[2]
            mask = torch.ones(s, total, dtype=torch.bool, device=x.device).tril(diagonal=total - s)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and s > 1,
            enable_gqa=self.num_groups != self.num_heads,
        )  # (B, nq, S, d)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # (B, S, nq d)
        return self.proj(out), new_cache


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.is_llama
        ffn = cfg.ffn_size
        self.fc = nn.Linear(cfg.hidden_size, 2 * ffn if self.swiglu else ffn, bias=not cfg.is_llama)
        self.proj = nn.Linear(ffn, cfg.hidden_size, bias=not cfg.is_llama)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, S, F) or (B, S, 2F)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)  # (B, S, H)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.input_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.post_attention_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, *, offset: int = 0, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        attn, new_cache = self.attention(self.input_norm(x), offset=offset, cache=cache)
        x = x + self.dropout(attn)  # (B, S, H)
        x = x + self.dropout(self.mlp(self.post_attention_norm(x)))
        return x, new_cache


def output_init_std(cfg: ModelConfig) -> float:
    """Scaled init for the projections that write into the residual stream (GPT-2 / Megatron)."""
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
