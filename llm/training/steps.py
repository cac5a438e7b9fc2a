"""The engine as the training loop sees it: one interface over DeepSpeed's plain and pipeline engines.

    steps.train(batches, scale)      one optimizer step over a global batch -> StepResult
    steps.evaluate(batches, iters)   the loss over `iters` global batches, without gradients
    steps.save(state, rank_state)    a checkpoint of the engine, the run's state and random streams
                                     (checkpoint.async_save: completed by `steps.background`)
    steps.load(tag_dir, ...)         a checkpoint back into the engine (at any layout)

The trainer's loop calls these and never asks which engine runs. Which of them reports the gradient
norm, and in which precision the run steps, comes from the run's optimizer plan
(`llm.engine.deepspeed_config.OptimizerPlan`), decided once. The random streams (dropout, and the
tensor-parallel RNG tracker) are the tracker given here, not something found on the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint.background import BackgroundSave
from llm.checkpoint.engine import load_checkpoint, save_checkpoint
from llm.checkpoint.rng import restore_rng_state
from llm.config import Config, DataConfig
from llm.engine.deepspeed_config import OptimizerPlan
from llm.engine.internals import before_pipeline_optimizer_step
from llm.model.inputs import model_inputs
from llm.model.moe import moe_metrics, update_expert_bias
from llm.parallel.cp_attention import cp_shard, scale_grad
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker
from llm.training.profile import step_part


@dataclass
class StepResult:
    """`loss` is read every step (spike detection): the one host-device synchronisation a step makes.
    `grad_norm` may still be a device tensor: `float()` it only when it is logged."""

    loss: float  # the mean over the global batch: every micro-batch, data-parallel rank and island
    grad_norm: float | torch.Tensor | None  # the global norm before clipping (None where no one measures it)
    lr: float  # the rate this step used


class Steps:
    """What both engines share: checkpoints, the module, the random streams."""

    def __init__(
        self, engine: Any, cfg: Config, ctx: ParallelContext, plan: OptimizerPlan, rng: RNGTracker
    ) -> None:
        self.engine, self.cfg, self.ctx, self.plan, self.rng = engine, cfg, ctx, plan, rng
        self.device = engine.device
        self.profiling = False  # a profiler runs: the step's parts are named ranges (llm.training.profile)
        # checkpoint.async_save: the save in flight (None: every save completes before it returns)
        self.background = (
            BackgroundSave(ctx, delay_seconds=cfg.debug.checkpoint_write_delay_seconds,
                           copy_delay_seconds=cfg.debug.checkpoint_copy_delay_seconds)  # fmt: skip
            if cfg.checkpoint.async_save
            else None
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module  # type: ignore[no-any-return]

    def train(self, batches: Iterator[torch.Tensor], scale: float | None, global_batch: int) -> StepResult:
        """One optimizer step over the next global batch of `batches` ((B, S + 1) micro-batches of this
        rank), `global_batch` samples (it changes during a batch-size ramp-up: the micro-batch size and
        data parallelism stay, gradient accumulation follows). `scale` (debug.inject_loss_spike_at)
        multiplies the loss before backward, so its gradients (NaN, or huge before clipping) reach the
        weights as a real spike's would."""
        raise NotImplementedError

    def _before_update(self) -> None:
        """Before the optimizer step changes the weights and optimizer state: an asynchronous save's
        host copy, made while this step's forward and backward ran, is complete."""
        if self.background is not None:
            with step_part("llm/checkpoint_copy_wait", self.profiling):
                self.background.before_update()

    def _inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return rank_inputs(tokens, self.cfg.data, self.ctx)

    def moe_metrics(self) -> dict[str, float]:
        """The MoE layers' statistics since the last call (llm.model.moe.moe_metrics); {} for a dense model.
        Every rank calls it."""
        return moe_metrics(self.module, self.ctx) if self.cfg.model.is_moe else {}

    def _scale_auxiliary_losses(self, accum: int) -> None:
        """MoE: the auxiliary losses' gradient, scaled as DeepSpeed's backward scales the LM loss's (and
        as the LM loss's is under context parallelism: OptimizerPlan.cp_grad_factor)."""
        moe = getattr(self.module, "moe", None)
        if moe is not None:
            moe.aux_grad_scale = self.plan.cp_grad_factor / accum

    def _accumulation(self, global_batch: int) -> int:
        """Micro-batches per rank for a global batch; DeepSpeed's engine (which sees one DiLoCo island's
        share: `Config.deepspeed_batch_size`) is told when it changes."""
        accum = global_batch // (self.cfg.train.micro_batch_size * self.ctx.data_size)
        if accum != self.engine.gradient_accumulation_steps():
            self.engine.set_train_batch_size(self.cfg.deepspeed_batch_size(global_batch))
        return accum

    def evaluate(self, batches: Iterator[torch.Tensor], iters: int) -> float:
        """The mean loss over `iters` global batches of `batches`, on every rank."""
        raise NotImplementedError

    def save(self, state: dict[str, Any], rank_state: dict[str, Any] | None) -> Path:
        return save_checkpoint(self.engine, self.cfg, state, ctx=self.ctx, rank_state=rank_state, rng=self.rng,
                               background=self.background)  # fmt: skip

    def load(self, tag_dir: Path, *, tokenizer_fingerprint: str | None) -> dict[str, Any]:
        return load_checkpoint(
            self.engine, tag_dir, self.cfg, self.ctx, tokenizer_fingerprint=tokenizer_fingerprint
        )

    def restore_rng(self, saved: Any) -> None:
        """Every random stream of this rank as a checkpoint saved it (None: left as they are)."""
        if saved is not None:
            restore_rng_state(saved, self.rng)

    def _reported_grad_norm(self) -> float | torch.Tensor | None:
        """The norm the plan says someone reports: llm's clipped optimizer, or DeepSpeed (a tensor or a
        number: not read here)."""
        if self.plan.grad_norm_from == "llm_optimizer":
            return self.engine.optimizer.last_grad_norm  # type: ignore[no-any-return]
        return self.engine.get_global_grad_norm()  # type: ignore[no-any-return]


class PlainSteps(Steps):
    """DeepSpeed's engine over the whole model: forward, backward and step for each micro-batch
    (DeepSpeed steps the optimizer at the last one of the global batch)."""

    def train(self, batches: Iterator[torch.Tensor], scale: float | None, global_batch: int) -> StepResult:
        accum = self._accumulation(global_batch)
        lr = float(self.engine.get_lr()[0])
        total: torch.Tensor | None = None  # the losses summed on the device: read once, below
        self._scale_auxiliary_losses(accum)
        on = self.profiling
        for micro in range(accum):
            # said, not counted: DeepSpeed's own count of micro-steps is off once the accumulation changes
            self.engine.set_gradient_accumulation_boundary(micro == accum - 1)
            with step_part("llm/data", on):
                inputs = self._inputs(next(batches))
            with step_part("llm/forward", on):
                loss = self.engine(*inputs)
            if scale is not None:
                loss = loss * scale
            with step_part("llm/backward", on):
                self.engine.backward(scale_grad(loss, self.plan.cp_grad_factor))
            if micro == accum - 1:  # DeepSpeed's step changes nothing saved before the boundary
                self._before_update()
            with step_part("llm/optimizer_step", on):  # the gradient reduction too, where DeepSpeed does it here
                self.engine.step()
            total = loss.detach() if total is None else total + loss.detach()
        update_expert_bias(self.module, self.ctx)
        norm = self._reported_grad_norm()
        assert total is not None
        return StepResult(self.ctx.mean_loss(total / accum), norm, lr)

    @torch.no_grad()
    def evaluate(self, batches: Iterator[torch.Tensor], iters: int) -> float:
        self.engine.eval()
        losses = [float(self.engine(*self._inputs(t))) for t in batches]
        self.engine.train()
        return self.ctx.mean_over_dp([sum(losses) / max(1, len(losses))])[0]


class PipelineSteps(Steps):
    """DeepSpeed's pipeline engine: one call runs all micro-batches of the global batch through the
    stages; the loss comes back averaged over them and the island's data-parallel ranks, on every
    stage. A spike's scale is applied inside the last stage's loss function, before backward (the loss
    function runs inside DeepSpeed's schedule)."""

    def __init__(
        self, engine: Any, cfg: Config, ctx: ParallelContext, plan: OptimizerPlan, rng: RNGTracker
    ) -> None:
        super().__init__(engine, cfg, ctx, plan, rng)
        background = self.background
        if background is not None:  # inside the schedule, after the batch's forward and backward passes
            # (not a profiler range of its own: the whole schedule is one)
            before_pipeline_optimizer_step(engine, background.before_update)

    def train(self, batches: Iterator[torch.Tensor], scale: float | None, global_batch: int) -> StepResult:
        self._scale_auxiliary_losses(self._accumulation(global_batch))
        lr = float(self.engine.get_lr()[0])
        loss_fn = self.engine.module.loss_fn
        loss_fn.factor, loss_fn.grad_factor = scale, self.plan.cp_grad_factor
        try:
            with step_part("llm/pipeline_schedule", self.profiling):  # data, stages, reduction and step
                loss = self.engine.train_batch(data_iter=pipeline_pairs(batches, self.cfg.data, self.ctx))
        finally:
            loss_fn.factor = None
        update_expert_bias(self.module, self.ctx)
        norm = self._reported_grad_norm()
        return StepResult(self.ctx.mean_over_islands(float(loss)), norm, lr)

    @torch.no_grad()
    def evaluate(self, batches: Iterator[torch.Tensor], iters: int) -> float:
        pairs = pipeline_pairs(batches, self.cfg.data, self.ctx)
        micro = self.cfg.grad_accumulation_steps(self.ctx.world_size)  # at the full global batch
        losses = [float(self.engine.eval_batch(pairs, num_micro_batches=micro)) for _ in range(iters)]
        # already averaged over micro-batches and the island's data-parallel ranks
        return self.ctx.mean_over_islands(sum(losses) / len(losses))


def make_steps(engine: Any, cfg: Config, ctx: ParallelContext, plan: OptimizerPlan, rng: RNGTracker) -> Steps:
    return (PipelineSteps if plan.pipeline else PlainSteps)(engine, cfg, ctx, plan, rng)


def rank_inputs(tokens: torch.Tensor, data: DataConfig, ctx: ParallelContext) -> tuple[torch.Tensor | None, ...]:
    """The model's inputs (ids, labels, positions, doc ids: `model_inputs`) of a (B, S + 1) batch; under
    context parallelism this rank's two chunks of ids, labels and positions (`cp_shard`): no rank
    keeps the full-length activations. Document ids stay whole: attention needs every token's."""
    inputs = model_inputs(tokens, data)
    if ctx.cp == 1:
        return inputs
    ids, labels, *docs = (None if t is None else cp_shard(t, ctx.cp, ctx.cp_rank) for t in inputs[:3])
    return (ids, labels, *docs, *inputs[3:])


def pipeline_pairs(
    batches: Iterator[torch.Tensor], data: DataConfig, ctx: ParallelContext
) -> Iterator[tuple[Any, torch.Tensor]]:
    """(B, S + 1) token batches -> (inputs, labels) as DeepSpeed's pipeline expects: the first stage
    reads the inputs (with document-aware training: ids, positions, doc ids; under context parallelism
    ids and positions, the positions of this rank's chunks; each passed on from stage to stage), the
    last the labels."""
    for tokens in batches:
        inputs, labels, *docs = rank_inputs(tokens, data, ctx)
        assert inputs is not None and labels is not None
        if not docs and ctx.cp == 1:
            yield inputs.contiguous(), labels.contiguous()
            continue
        positions, doc_ids = docs if docs else (None, None)
        if positions is None:
            full = torch.arange(inputs.shape[1] * ctx.cp, device=inputs.device)
            positions = cp_shard(full, ctx.cp, ctx.cp_rank, dim=0).expand_as(inputs)
        if not docs:  # plain causal attention under CP: no document ids to pass
            yield (inputs.contiguous(), positions.contiguous()), labels.contiguous()
            continue
        if doc_ids is None:
            doc_ids = torch.zeros(inputs.shape[0], inputs.shape[1] * ctx.cp, dtype=inputs.dtype, device=inputs.device)
        yield (inputs.contiguous(), positions.contiguous(), doc_ids.contiguous()), labels.contiguous()
