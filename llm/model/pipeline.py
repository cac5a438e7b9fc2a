"""The GPT as a DeepSpeed PipelineModule: thin adapters over the same blocks as `GPT`.

Layer list (indices are DeepSpeed's layer ids, used in its checkpoint file names):

    0          embedding (token + learned positions), TiedLayerSpec "embed" when embeddings are tied
    1 .. L     TransformerBlockPipe(i - 1)
    L + 1      final norm
    L + 2      LM head: the tied embedding again (forward_fn), or its own vocab-parallel weight

Each adapter initializes its parameters under the plain model's names (`layers.3.mlp.fc.weight`),
so the pipeline model starts from exactly the weights of `GPT` with the same seed, and its
checkpoints map back to those names (`llm.model.names`). Inputs reach the first stage, labels the
last; the loss is `lm_loss` of the plain model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm.config import Config, ModelConfig
from llm.engine.pipeline_grid import keep_model_group_in_island, pipeline_module_class, pipeline_topology
from llm.model.gpt import init_parameters, lm_head_local_logits, lm_loss
from llm.model.layers import TransformerBlock, make_norm
from llm.model.moe import MoEState, checkpoint_contexts
from llm.parallel.cp_attention import scale_grad
from llm.parallel.layers import VocabParallelEmbedding
from llm.parallel.mappings import scatter_to_sequence
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker, checkpoint_context_fn

PARTITION_METHODS = {
    "parameters": "parameters",
    "uniform": "uniform",
    "type:TransformerBlock": "type:TransformerBlockPipe",
}


class EmbeddingPipe(nn.Module):
    """Stage-0 layer: token ids (B, S) -> hidden (B, S, H) (or (B, S / tp, H) under SP)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, rng: RNGTracker, seed: int) -> None:
        super().__init__()
        self.ctx, self.rng, self.sequence_parallel = ctx, rng, cfg.sequence_parallel
        self.embed = VocabParallelEmbedding(cfg.padded_vocab_size(ctx.tp), cfg.hidden_size, ctx=ctx)
        self.pos_embed = None if cfg.is_llama else nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        init_parameters(self, cfg, seed, ctx)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
        """ids (B, S), or (ids, positions, doc_ids) for document-aware training, or (ids, positions)
        under context parallelism (this rank's chunks), passed on with the hidden state to every block."""
        input_ids, *docs = inputs if isinstance(inputs, tuple) else (inputs,)
        x = self.embed(input_ids)  # (B, S, H)
        if self.pos_embed is not None:
            positions = docs[0] if docs else torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.pos_embed(positions)
        if self.sequence_parallel:
            x = scatter_to_sequence(x, self.ctx)  # (B, S / tp, H)
            with self.rng.fork():
                x = self.embed_dropout(x)
        else:
            x = self.embed_dropout(x)
        return (x, *docs) if docs else x


def tied_lm_head(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The last stage's use of the tied embedding: hidden -> local logits (B, S, V_padded / tp)."""
    return lm_head_local_logits(
        hidden, module.embed.weight, module.ctx, sequence_parallel=module.sequence_parallel
    )


class TransformerBlockPipe(TransformerBlock):
    """The plain block with a single-tensor interface for the pipeline."""

    def __init__(
        self, cfg: ModelConfig, layer_number: int, ctx: ParallelContext, rng: RNGTracker, seed: int,
        moe: MoEState | None = None,
    ) -> None:  # fmt: skip
        super().__init__(cfg, layer_number, ctx, rng, moe)
        init_parameters(self, cfg, seed, ctx, prefix=f"layers.{layer_number}.")
        if cfg.compile:
            self.compile()

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:  # type: ignore[override]
        if isinstance(x, tuple):  # (hidden, positions, doc_ids), or (hidden, positions) under CP
            hidden, *passed = x
            doc_ids = passed[1] if len(passed) > 1 else None
            return super().forward(hidden, positions=passed[0], doc_ids=doc_ids)[0], *passed
        return super().forward(x)[0]


class FinalNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, seed: int) -> None:
        super().__init__()
        self.final_norm = make_norm(cfg, ctx)
        init_parameters(self, cfg, seed, ctx)

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.final_norm(x[0] if isinstance(x, tuple) else x)


class LMHeadPipe(nn.Module):
    """Untied output layer (vocab-parallel rows, named `lm_head.weight` as in the plain model)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, seed: int) -> None:
        super().__init__()
        self.ctx, self.sequence_parallel = ctx, cfg.sequence_parallel
        self.lm_head = VocabParallelEmbedding(cfg.padded_vocab_size(ctx.tp), cfg.hidden_size, ctx=ctx)
        init_parameters(self, cfg, seed, ctx)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head_local_logits(
            hidden, self.lm_head.weight, self.ctx, sequence_parallel=self.sequence_parallel
        )


class PipelineLoss:
    """loss_fn(local logits, labels) for the last stage: the plain model's loss. `factor` (set by the
    trainer for one step: debug.inject_loss_spike_at) multiplies it before backward, so an injected
    spike reaches the weights under the pipeline engine as it does without one; `grad_factor`
    multiplies only its gradient (context parallelism: OptimizerPlan.cp_grad_factor)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        self.ctx = ctx
        self.vocab_size = int(cfg.vocab_size or 0)
        self.vocab_start = ctx.tp_rank * (cfg.padded_vocab_size(ctx.tp) // ctx.tp)
        self.factor: float | None = None
        self.grad_factor = 1  # the run's OptimizerPlan.cp_grad_factor (set by the trainer's steps)

    def __call__(self, local_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(
            local_logits, labels, self.ctx, vocab_start=self.vocab_start, vocab_size=self.vocab_size
        )
        loss = scale_grad(loss, self.grad_factor)
        return loss if self.factor is None else loss * self.factor


def build_pipeline_model(cfg: Config, ctx: ParallelContext, rng: RNGTracker) -> Any:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    m, seed = cfg.model, cfg.train.seed
    moe = MoEState()  # shared by this stage's MoE layers, as GPT.moe
    if m.tied:
        first: Any = TiedLayerSpec(
            "embed", EmbeddingPipe, m, ctx, rng, seed, tied_weight_attr=["embed.weight"]
        )
        last: Any = TiedLayerSpec(
            "embed",
            EmbeddingPipe,
            m,
            ctx,
            rng,
            seed,
            forward_fn=tied_lm_head,
            tied_weight_attr=["embed.weight"],
        )
    else:
        first, last = LayerSpec(EmbeddingPipe, m, ctx, rng, seed), LayerSpec(LMHeadPipe, m, ctx, seed)
    specs = [
        first,
        *(LayerSpec(TransformerBlockPipe, m, i, ctx, rng, seed, moe) for i in range(m.num_layers)),
        LayerSpec(FinalNormPipe, m, ctx, seed),
        last,
    ]
    module = pipeline_module_class()(
        layers=specs,
        topology=pipeline_topology(
            ctx
        ),  # with DiLoCo islands: one grid per island (llm.engine.pipeline_grid)
        loss_fn=PipelineLoss(m, ctx),
        partition_method=PARTITION_METHODS[cfg.parallel.pipeline_partition_method],
        activation_checkpoint_interval=1 if m.activation_checkpointing else 0,
        activation_checkpoint_func=partial(_checkpoint, rng, moe),
        checkpointable_layers=["TransformerBlockPipe"],
    )
    module.moe = moe
    keep_model_group_in_island(module, ctx)
    return module


def _checkpoint(rng: RNGTracker, moe: MoEState, function: Any, *args: torch.Tensor) -> Any:
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: checkpoint_contexts(checkpoint_context_fn(rng), moe))  # fmt: skip
