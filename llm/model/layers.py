"""Transformer building blocks: norms, rotary embeddings, attention, MLP, the block.

Parameter layouts are chosen so that tensor parallelism can split them along their first
dimension without reordering:

- `attention.qkv.weight` ((nq + 2 nkv) d, h): grouped by KV group (llm/parallel/qkv.py).
- `mlp.fc.weight` (llama: (2 f, h)): [gate | up].
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm.config import ModelConfig
from llm.model import activations
from llm.model.activations import activate
from llm.model.moe import MoE, MoEState
from llm.parallel.cp_attention import ring_attention, ulysses_attention
from llm.parallel.layers import (
    ColumnParallelLinear,
    GroupedQKVParallelLinear,
    RowParallelLinear,
    sequence_parallel_param,
    tp_input,
    tp_output,
)
from llm.parallel.process_groups import ParallelContext
from llm.parallel.qkv import split_qkv
from llm.parallel.random import RNGTracker

KVCache = tuple[torch.Tensor, torch.Tensor]
# Above this many attention calls per sample (documents per sample, on average) one block-diagonal
# mask replaces the per-document calls.
MAX_DOCUMENT_CALLS_PER_SAMPLE = 8


def document_ids(input_ids: torch.Tensor, eod_id: int) -> torch.Tensor:
    """(B, S) token ids -> (B, S) index of the document each token belongs to inside its sample: an
    EOD token ends its document, the token after it starts the next (Megatron's convention)."""
    ends = (input_ids == eod_id).long()
    return torch.cumsum(ends, dim=1) - ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, S) position of each token inside its document."""
    s = doc_ids.shape[1]
    idx = torch.arange(s, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def _segment_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (N,) flat positions (b * S + t) where a document starts, in order;
    every sample starts one."""
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return new.flatten().nonzero().flatten()


def document_spans(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(B, S) document ids -> per sample, the [start, end) of each document."""
    b, s = doc_ids.shape
    spans: list[list[tuple[int, int]]] = [[] for _ in range(b)]
    starts = _segment_starts(doc_ids).tolist() + [b * s]
    for lo, hi in zip(starts[:-1], starts[1:]):
        spans[lo // s].append((lo % s, hi - (lo // s) * s))
    return spans


@functools.cache
def varlen() -> tuple[Any, bool]:
    """torch's variable-length flash attention where this torch has it with a causal window, and
    whether it takes grouped-query K/V itself (torch 2.11's does not). Imported at first use on a
    GPU: the module pulls in torch._dynamo, over a second of start-up for every process otherwise."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    params = inspect.signature(varlen_attn).parameters
    return (varlen_attn if "window_size" in params else None), "enable_gqa" in params


USE_VARLEN = True  # False: the block-mask path on GPU too (benchmarks compare the two)


def _document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, *, dropout: float, gqa: bool
) -> torch.Tensor:
    """Causal attention within documents only: (B, heads, S, d) -> (B, nq, S, d), contiguous.

    GPU (bf16/fp16, no attention dropout): every document of the batch in one variable-length
    flash-attention call. CPU: one causal SDPA call per document (no S x S mask; the calls are
    cheap next to the compute). Otherwise (attention dropout, fp32 on GPU, or over
    MAX_DOCUMENT_CALLS_PER_SAMPLE documents per sample on CPU): one SDPA call with a block-diagonal
    causal mask."""
    b, s = doc_ids.shape
    starts = _segment_starts(doc_ids)
    n = int(starts.numel())
    if n == b:  # no document boundary in the batch
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=s > 1, enable_gqa=gqa)
    fused, fused_gqa = varlen() if q.is_cuda and USE_VARLEN else (None, False)
    if fused is not None and dropout == 0 and q.dtype in (torch.float16, torch.bfloat16):
        cu = torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        kw = {"enable_gqa": gqa} if fused_gqa else {}
        if gqa and not fused_gqa:  # each query head's K/V group, repeated
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        flat = [
            t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[3]) for t in (q, k, v)
        ]  # (B S, heads, d)
        out = fused(*flat, cu, cu, longest, longest, window_size=(-1, 0), **kw)
        return out.view(b, s, q.shape[1], q.shape[3]).transpose(1, 2).contiguous()
    if q.is_cuda or n > MAX_DOCUMENT_CALLS_PER_SAMPLE * b:
        same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)  # (B, S, S)
        mask = (same & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()).unsqueeze(1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
    rows = []
    for i, sample in enumerate(document_spans(doc_ids)):
        parts = [
            F.scaled_dot_product_attention(
                q[i : i + 1, :, lo:hi],
                k[i : i + 1, :, lo:hi],
                v[i : i + 1, :, lo:hi],
                dropout_p=dropout,
                is_causal=hi - lo > 1,
                enable_gqa=gqa,
            )  # fmt: skip
            for lo, hi in sample
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)


class RMSNorm(nn.Module):
    def __init__(
        self, size: int, *, eps: float, ctx: ParallelContext, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ctx = ctx
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = sequence_parallel_param(self.weight, self.ctx, self.sequence_parallel)
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), self.eps)  # fused where torch has a kernel


class LayerNorm(nn.Module):
    def __init__(
        self, size: int, *, eps: float, ctx: ParallelContext, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps
        self.ctx = ctx
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = sequence_parallel_param(self.weight, self.ctx, self.sequence_parallel)
        b = sequence_parallel_param(self.bias, self.ctx, self.sequence_parallel)
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)


def make_norm(cfg: ModelConfig, ctx: ParallelContext) -> nn.Module:
    """Norms run on sequence shards under sequence parallelism (their gradients are then summed)."""
    cls = RMSNorm if cfg.is_llama else LayerNorm
    return cls(cfg.hidden_size, eps=cfg.norm_eps, ctx=ctx, sequence_parallel=cfg.sequence_parallel)


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

    def forward(self, x: torch.Tensor, offset: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, heads, S, d); positions (B, S) replace offset + arange(S) (positions restarting per document)
        seq = x.shape[-2]
        if offset + seq > self.cos.shape[0]:
            raise ValueError(
                f"position {offset + seq} exceeds the rotary table ({self.cos.shape[0]} positions)"
            )
        if positions is not None:
            cos = self.cos[positions].unsqueeze(1).to(x.dtype)  # (B, 1, S, d)
            sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        else:
            cos = self.cos[offset : offset + seq].to(x.dtype)  # (S, d)
            sin = self.sin[offset : offset + seq].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Heads (and KV groups) are split across the tensor-parallel group: qkv is column-parallel,
    the output projection row-parallel. Attention dropout acts on sharded heads, so it draws from
    the per-rank model-parallel RNG stream."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, rng: RNGTracker) -> None:
        super().__init__()
        self.rng = rng
        self.ctx = ctx
        self.num_heads = cfg.num_attention_heads // ctx.tp  # local
        self.num_groups = cfg.kv_groups // ctx.tp  # local
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        bias = not cfg.is_llama
        sp = cfg.sequence_parallel
        qkv_out = (cfg.num_attention_heads + 2 * cfg.kv_groups) * self.head_dim
        self.qkv: nn.Module
        if cfg.kv_groups % ctx.tp == 0:  # whole KV groups per rank
            self.qkv = ColumnParallelLinear(
                cfg.hidden_size, qkv_out, bias=bias, ctx=ctx, sequence_parallel=sp
            )
        else:  # fewer KV groups than ranks: each rank sees one group, KV rows sliced and gathered
            self.num_groups = 1
            self.qkv = GroupedQKVParallelLinear(
                cfg.hidden_size, heads=cfg.num_attention_heads, groups=cfg.kv_groups, head_dim=self.head_dim,
                ctx=ctx, sequence_parallel=sp,
            )  # fmt: skip
        self.proj = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=bias, ctx=ctx, sequence_parallel=sp
        )
        self.rotary = (
            Rotary(self.head_dim, max_positions=cfg.max_positions, theta=cfg.rope_theta)
            if cfg.is_llama
            else None
        )
        # In a compiled block it runs eagerly (its spans depend on the data); wrapped only then, as
        # torch.compiler.disable imports torch._dynamo (over a second of every process's start-up).
        self.document_attention = (
            torch.compiler.disable(_document_attention) if cfg.compile else _document_attention
        )

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_qkv(qkv, heads=self.num_heads, groups=self.num_groups, head_dim=self.head_dim, dim=-1)
        # q (B, S, nq, d); k, v (B, S, g, d)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, d)

    def forward(
        self,
        x: torch.Tensor,
        *,
        offset: int = 0,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        gathered: bool = False,
        reduce: bool = True,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """`gathered`/`reduce`: see ColumnParallelLinear / RowParallelLinear (parallel blocks)."""
        qkv = self.qkv(
            x, gathered=gathered
        )  # (B, S, (nq + 2 g) d / tp); S is the full sequence also under SP
        b, s, _ = qkv.shape
        q, k, v = self._split_qkv(qkv)
        if self.rotary is not None:
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        dropout = self.dropout if self.training else 0.0
        # Dropout draws from the model-parallel stream; without dropout nothing is drawn.
        rng = self.rng.fork() if dropout > 0 else contextlib.nullcontext()
        if self.ctx.cp > 1 and cache is None:  # this rank's two chunks of the sequence (cp_attention.py)
            # doc_ids: the whole sequence's (every rank computes them from the whole batch)
            gqa = self.num_groups != self.num_heads
            attend = (functools.partial(_causal, gqa=gqa) if doc_ids is None else
                      functools.partial(self.document_attention, doc_ids=doc_ids, dropout=0.0, gqa=gqa))  # fmt: skip
            out = (
                ring_attention(q, k, v, self.ctx, doc_ids)
                if self.ctx.cp_comm_type == "p2p"
                else ulysses_attention(q, k, v, self.ctx, attend)
            )  # (B, nq, S / C, d)
            out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
            return self.proj(out, reduce=reduce), None
        if doc_ids is not None and cache is None:
            with rng:
                out = self.document_attention(
                    q, k, v, doc_ids, dropout=dropout, gqa=self.num_groups != self.num_heads
                )
            out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
            return self.proj(out, reduce=reduce), None
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
        with rng:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal and s > 1,
                enable_gqa=self.num_groups != self.num_heads,
            )  # (B, nq, S, d)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # (B, S, nq d)
        return self.proj(out, reduce=reduce), new_cache


class MLP(nn.Module):
    """fc column-parallel (SwiGLU: [gate | up] as one matmul, stride 2), proj row-parallel."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, *, ffn: int | None = None) -> None:
        """`ffn`: the hidden size (default model.ffn_hidden_size; the shared experts of an MoE block
        have their own)."""
        super().__init__()
        self.swiglu = cfg.is_llama
        self.kind = "swiglu" if self.swiglu else "gelu"
        self.activation = activations.pair(self.kind)  # applied inside proj, which then keeps its input
        ffn = ffn or cfg.ffn_size
        sp = cfg.sequence_parallel
        self.fc = ColumnParallelLinear(
            cfg.hidden_size, 2 * ffn if self.swiglu else ffn, bias=not cfg.is_llama, ctx=ctx,
            stride=2 if self.swiglu else 1, sequence_parallel=sp,
        )  # fmt: skip
        self.proj = RowParallelLinear(
            ffn, cfg.hidden_size, bias=not cfg.is_llama, ctx=ctx, sequence_parallel=sp
        )

    def forward(self, x: torch.Tensor, *, gathered: bool = False, reduce: bool = True) -> torch.Tensor:
        h = self.fc(x, gathered=gathered)  # (B, S, F) or (B, S, 2F)
        if not activations.RECOMPUTE_ACTIVATION:
            return self.proj(activate(h, self.kind), reduce=reduce)
        # the projection's input, activate(h), is recomputed in backward rather than kept (in FP8: its
        # float8 copy, cast again at forward's scale)
        return self.proj(h, reduce=reduce, activation=self.activation)  # (B, S, H)

    def output_bias(self, y: torch.Tensor) -> torch.Tensor:
        """The bias a `reduce=False` call left out (parallel blocks add it after their one reduction)."""
        return self.proj.output_bias(y)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `model.parallel_block`: x + attn(norm(x)) + mlp(norm(x)) (GPT-J, PaLM; with
    `parallel_block_norms: 2` each branch has its own norm, as GPT-NeoX). Under tensor parallelism
    the two row-parallel partial sums are added before one all-reduce (one reduce-scatter under
    sequence parallelism) and, with one norm, the column-parallel layers share one input gather /
    one backward all-reduce: half the layer's TP communication.

    Residual dropout acts on the full residual stream, replicated across TP ranks (default RNG,
    the same mask everywhere), or on sequence shards under sequence parallelism (per-rank stream).
    """

    def __init__(
        self, cfg: ModelConfig, layer_number: int, ctx: ParallelContext, rng: RNGTracker, moe: MoEState | None = None
    ) -> None:
        """`moe`: the state the model's MoE layers share (a block in model.moe_layers has a mixture of
        experts as its MLP)."""
        super().__init__()
        self.layer_number = layer_number
        self.rng = rng
        self.ctx = ctx
        self.sharded_dropout = cfg.sequence_parallel
        self.sequence_parallel = cfg.sequence_parallel
        self.parallel = cfg.parallel_block
        self.input_norm = make_norm(cfg, ctx)
        self.attention = Attention(cfg, ctx, rng)
        self.post_attention_norm = (
            make_norm(cfg, ctx) if not cfg.parallel_block or cfg.parallel_block_norms == 2 else None
        )
        self.mlp: MLP | MoE
        if layer_number in cfg.moe_layers:
            shared = cfg.moe_shared_expert_intermediate_size
            self.mlp = MoE(cfg, ctx, moe or MoEState(), MLP(cfg, ctx, ffn=shared) if shared else None)
        else:
            self.mlp = MLP(cfg, ctx)
        self.dropout = nn.Dropout(cfg.dropout)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.sharded_dropout and self.training and self.dropout.p > 0:
            with self.rng.fork():
                return self.dropout(x)
        return self.dropout(x)

    def forward(
        self,
        x: torch.Tensor,
        *,
        offset: int = 0,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        docs = {"offset": offset, "cache": cache, "positions": positions, "doc_ids": doc_ids}
        if self.parallel:
            return self._parallel_forward(x, docs)
        attn, new_cache = self.attention(self.input_norm(x), **docs)
        x = x + self._drop(attn)  # (B, S, H), or (B, S / tp, H) under sequence parallelism
        assert self.post_attention_norm is not None
        x = x + self._drop(self.mlp(self.post_attention_norm(x)))
        return x, new_cache

    def _parallel_forward(self, x: torch.Tensor, docs: dict) -> tuple[torch.Tensor, KVCache | None]:
        sp = self.sequence_parallel
        if self.post_attention_norm is None:  # one norm: one gathered input for both branches
            h = tp_input(self.input_norm(x), self.ctx, sp)
            attn, new_cache = self.attention(h, gathered=True, reduce=False, **docs)
            mlp = self.mlp(h, gathered=True, reduce=False)
        else:
            attn, new_cache = self.attention(self.input_norm(x), reduce=False, **docs)
            mlp = self.mlp(self.post_attention_norm(x), reduce=False)
        out = tp_output(attn + mlp, self.ctx, sp)  # (B, S, H), or (B, S / tp, H) under SP
        out = self.mlp.output_bias(self.attention.proj.output_bias(out))
        return x + self._drop(out), new_cache


def output_init_std(cfg: ModelConfig) -> float:
    """Scaled init for the projections that write into the residual stream (GPT-2 / Megatron)."""
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
