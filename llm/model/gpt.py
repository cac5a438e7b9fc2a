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
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.config import ModelConfig
from llm.model.layers import KVCache, TransformerBlock, make_norm, output_init_std
from llm.model.moe import MoEState, checkpoint_contexts
from llm.parallel.cp_attention import cp_positions, cp_token_mean
from llm.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy
from llm.parallel.layers import VocabParallelEmbedding, full_shape_of, partition_info, shard_by_spec
from llm.parallel.mappings import copy_to_tp, gather_from_sequence, gather_from_tp, scatter_to_sequence
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker, checkpoint_context_fn

# the projections that write into the residual stream (scaled init)
_OUTPUT_PROJECTIONS = ("attention.proj.weight", "mlp.proj.weight", "experts.proj.weight", "shared_experts.proj.weight")
IGNORE = -100  # a label that is not scored (F.cross_entropy's ignore_index), e.g. after an EOD


class GPT(nn.Module):
    def __init__(
        self, cfg: ModelConfig, ctx: ParallelContext | None = None, rng: RNGTracker | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx or ParallelContext.single()
        self.rng = rng or RNGTracker()
        self.vocab_size = int(cfg.vocab_size or 0)
        self.loss_chunk_tokens = cfg.loss_chunk_tokens
        padded = cfg.padded_vocab_size(self.ctx.tp)
        self.embed = VocabParallelEmbedding(padded, cfg.hidden_size, ctx=self.ctx)
        self.pos_embed = None if cfg.is_llama else nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.moe = MoEState()  # shared by the MoE layers (a dense model has none)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, i, self.ctx, self.rng, self.moe) for i in range(cfg.num_layers)
        )
        self.final_norm = make_norm(cfg, self.ctx)
        self.lm_head = None
        if not cfg.tied:  # vocab-parallel output layer, rows as the embedding
            self.lm_head = VocabParallelEmbedding(padded, cfg.hidden_size, ctx=self.ctx)
        self.activation_checkpointing = cfg.activation_checkpointing
        self.sequence_parallel = cfg.sequence_parallel
        if cfg.compile:
            for layer in self.layers:
                layer.compile()  # in place: parameter names (and checkpoints) stay those of eager

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight  # (V / tp, H)

    def embed_tokens(
        self, input_ids: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, S, H), replicated over TP
        if self.pos_embed is not None:
            if positions is None:
                positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
            x = x + self.pos_embed(positions)
        if self.sequence_parallel:
            x = scatter_to_sequence(x, self.ctx)  # (B, S / tp, H)
            with self.rng.fork():
                return self.embed_dropout(x)
        return self.embed_dropout(x)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        offset: int = 0,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KVCache] | None]:
        """`positions` (B, S): each token's position (restarting per document) instead of
        offset + 0..S-1; `doc_ids` (B, S): attention stays inside each token's document. Under context
        parallelism `input_ids` are this rank's two chunks of the sequence (`cp_shard`), and their
        positions follow the chunks."""
        if self.ctx.cp > 1 and positions is None:
            b, s = input_ids.shape
            positions = cp_positions(s * self.ctx.cp, self.ctx.cp, self.ctx.cp_rank, device=input_ids.device).expand(b, s)
        x = self.embed_tokens(input_ids, offset, positions)
        new_caches: list[KVCache] | None = [] if caches is not None else None
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training and caches is None:
                x, _ = checkpoint(
                    partial(layer, positions=positions, doc_ids=doc_ids), x, use_reentrant=False,
                    context_fn=lambda: checkpoint_contexts(checkpoint_context_fn(self.rng), self.moe),
                )  # fmt: skip
                continue
            cache = caches[i] if caches is not None else None
            x, c = layer(x, offset=offset, cache=cache, positions=positions, doc_ids=doc_ids)
            if new_caches is not None and c is not None:
                new_caches.append(c)
        return self.final_norm(x), new_caches  # (B, S, H) or (B, S / tp, H) under SP

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S[/tp], H) -> this rank's vocabulary shard of the logits (B, S, V_padded / tp)."""
        return lm_head_local_logits(
            hidden, self.output_weight(), self.ctx, sequence_parallel=self.sequence_parallel
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (padding dropped), gathered: (B, S, V)."""
        if self.ctx.tp == 1 and not self.sequence_parallel:
            return F.linear(hidden, self.output_weight()[: self.vocab_size])
        return gather_from_tp(self.local_logits(hidden), self.ctx)[..., : self.vocab_size]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy over the labels that are not IGNORE (-100); vocabulary-parallel
        when TP > 1 (full logits never gathered); under context parallelism the mean over every CP
        rank's tokens (`lm_loss`). With model.loss_chunk_tokens the LM head and the loss run together
        over chunks of tokens (`chunked_linear_cross_entropy`): no (tokens x vocabulary) logits."""
        if self.loss_chunk_tokens:
            x = lm_head_input(hidden, self.ctx, sequence_parallel=self.sequence_parallel).flatten(0, 1)
            losses = chunked_linear_cross_entropy(x, self.output_weight(), labels.flatten(), self.ctx,
                                                  vocab_start=self.embed.vocab_start, vocab_size=self.vocab_size,
                                                  chunk=self.loss_chunk_tokens)  # fmt: skip
            return token_mean(losses, labels.flatten(), self.ctx)
        if self.ctx.tp == 1 and self.ctx.cp == 1:
            return F.cross_entropy(self.logits(hidden).float().flatten(0, 1), labels.flatten())
        return lm_loss(self.local_logits(hidden), labels, self.ctx, vocab_start=self.embed.vocab_start,
                       vocab_size=self.vocab_size)  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean token cross-entropy when `labels` is given, else logits (B, S, V)."""
        hidden, _ = self.hidden_states(input_ids, positions=positions, doc_ids=doc_ids)
        if labels is None:
            return self.logits(hidden)
        return self.loss(hidden, labels)


def lm_head_local_logits(
    hidden: torch.Tensor, weight: torch.Tensor, ctx: ParallelContext, *, sequence_parallel: bool
) -> torch.Tensor:
    """(B, S[/tp], H) and this rank's output rows (V_padded / tp, H) -> local logits (B, S, V_padded / tp)."""
    return F.linear(lm_head_input(hidden, ctx, sequence_parallel=sequence_parallel), weight)


def lm_head_input(hidden: torch.Tensor, ctx: ParallelContext, *, sequence_parallel: bool) -> torch.Tensor:
    """What the vocabulary-parallel LM head multiplies: the whole sequence's hidden states on every TP
    rank (gathered under sequence parallelism), their gradient summed over TP in backward."""
    return gather_from_sequence(hidden, ctx) if sequence_parallel else copy_to_tp(hidden, ctx)


def lm_loss(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    ctx: ParallelContext,
    *,
    vocab_start: int,
    vocab_size: int,
) -> torch.Tensor:
    """Mean token cross-entropy from local logits over the labels that are not IGNORE (-100, as in
    `F.cross_entropy`); padded ids never take probability mass. Under context parallelism the labels
    are this rank's chunks and the mean is over every CP rank's tokens, the same on each
    (`cp_token_mean`): never a mean of per-rank means."""
    if ctx.tp == 1 and ctx.cp == 1:
        return F.cross_entropy(local_logits[..., :vocab_size].float().flatten(0, 1), labels.flatten())
    labels = labels.flatten()
    if ctx.tp == 1:
        losses = F.cross_entropy(local_logits[..., :vocab_size].float().flatten(0, 1), labels, reduction="none")
    else:
        losses = vocab_parallel_cross_entropy(
            local_logits.flatten(0, 1), labels, ctx, vocab_start=vocab_start, vocab_size=vocab_size
        )
    return token_mean(losses, labels, ctx)


def token_mean(losses: torch.Tensor, labels: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The mean of per-token losses (N,) over the labels (N,) that are not IGNORE; under context
    parallelism over every CP rank's tokens (`cp_token_mean`)."""
    valid = labels != IGNORE
    if ctx.cp > 1:
        return cp_token_mean(losses, valid, ctx)
    return losses.masked_fill(~valid, 0.0).sum() / valid.sum()


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_full_parameter(
    name: str, shape: torch.Size, cfg: ModelConfig, seed: int, *, expert: int | None = None
) -> torch.Tensor:
    """The full (unsharded) initial value of a parameter, from its name alone (for the stacked weights
    of MoE experts: of one expert, from its name and number)."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if "norm" in name:
        return torch.ones(shape)
    std = output_init_std(cfg) if name.endswith(_OUTPUT_PROJECTIONS) else cfg.init_std
    gen = torch.Generator().manual_seed(_param_seed(seed, name if expert is None else f"{name}#{expert}"))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_parameters(
    module: nn.Module, cfg: ModelConfig, seed: int, ctx: ParallelContext, *, prefix: str = ""
) -> None:
    """Every rank draws the full tensor of each parameter, named `prefix + name` as in the plain GPT,
    and keeps its shard: the same weights at any TP / PP layout."""
    for name, p in module.named_parameters():
        spec = partition_info(p)
        if getattr(p, "expert_parallel", False):  # each expert drawn on its own: the same at any EP
            first = ctx.ep_rank * p.shape[0]
            value = torch.stack([init_full_parameter(prefix + name, p.shape[1:], cfg, seed, expert=first + i)
                                 for i in range(p.shape[0])])  # fmt: skip
        elif spec is not None:
            full = init_full_parameter(prefix + name, full_shape_of(p), cfg, seed)
            value = shard_by_spec(full, spec, rank=ctx.tp_rank, size=ctx.tp)
        else:
            value = init_full_parameter(prefix + name, p.shape, cfg, seed)
        p.copy_(value.to(p.dtype))


def init_weights(model: GPT, cfg: ModelConfig, seed: int) -> None:
    init_parameters(model, cfg, seed, model.ctx)


def build_model(
    cfg: ModelConfig, *, seed: int, ctx: ParallelContext | None = None, rng: RNGTracker | None = None
) -> GPT:
    model = GPT(cfg, ctx, rng)
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
