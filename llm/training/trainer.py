"""The training loop over a DeepSpeed engine: steps, evaluation, metrics, checkpoints."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint.engine import choose_verified, load_checkpoint, save_checkpoint
from llm.checkpoint.format import CheckpointError, checkpoint_bytes, complete_tags
from llm.checkpoint.reshard import torch_optimizer
from llm.checkpoint.rng import restore_rng_state, rng_state
from llm.config import Config, ConfigError, DataConfig, resolve_precision
from llm.data.loader import GlobalBatchSampler, make_loader
from llm.errors import LLMError
from llm.model.flops import gpu_peak_tflops, model_flops_per_token
from llm.model.inputs import model_inputs
from llm.parallel.context import ParallelContext
from llm.parallel.grads import global_grad_norm
from llm.training.diloco import DiLoCo
from llm.training.faults import Spike, SpikeDetector, injected_loss_factor
from llm.training.lr_schedule import lr_at
from llm.training.memory import PeakMemory
from llm.training.metrics import MetricsLogger
from llm.training.signals import LauncherWatch, StopRequest

logger = logging.getLogger("llm")


class TrainingError(LLMError, RuntimeError):
    """Training cannot go on (for example a non-finite loss); the message says where and why."""


# (model, iteration) -> {"lm_eval/<task>/<metric>": value}; see run_pretraining
PeriodicEval = Callable[[torch.nn.Module, int], dict[str, float]]


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    wandb_run_id: str | None = None
    stopped_by: str | None = None  # set when a run stops before train_iters (signal, exit_interval)
    skipped_samples: int = 0  # skipped in total by loss-spike rollbacks
    rollbacks: int = 0
    data_identity: dict[str, Any] | None = None  # what the run trains on (llm.data.identity)
    spike_history: list[float] = field(default_factory=list)  # the spike detector's window at the save


def load_train_state(
    engine: Any, tag_dir: Any, cfg: Config, ctx: ParallelContext, *, tokenizer_fingerprint: str | None,
    diloco: DiLoCo | None = None,
) -> tuple[TrainState, Any, list[str]]:  # fmt: skip
    """Loads a checkpoint into the engine (and DiLoCo's outer state): (the saved training state, this
    rank's saved RNG state, the settings that changed since the checkpoint as `train.lr: 0.0003 ->
    0.0001`). The optimizer and LR schedule then follow the run's config, not the saved one (see
    `apply_optimizer_settings`)."""
    saved = load_checkpoint(engine, tag_dir, cfg, ctx, tokenizer_fingerprint=tokenizer_fingerprint)
    if diloco is not None:
        if "diloco_state" not in saved:
            raise CheckpointError(
                f"checkpoint '{tag_dir}' holds no DiLoCo state for rank {ctx.rank}; use an earlier one"
            )
        try:
            diloco.load_state_dict(saved["diloco_state"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint '{tag_dir}': {e}") from None
    apply_optimizer_settings(engine, cfg)
    state = TrainState(
        iteration=int(saved["iteration"]), consumed_samples=int(saved["consumed_samples"]),
        wandb_run_id=saved.get("wandb_run_id"), skipped_samples=int(saved.get("skipped_samples", 0)),
        rollbacks=int(saved.get("rollbacks", 0)), data_identity=saved.get("data_identity"),
        spike_history=[float(x) for x in saved.get("spike_history", [])],
    )  # fmt: skip
    return state, saved.get("rng_state"), changed_settings(saved.get("config", {}), cfg)


# Sections whose changes a resume reports (model changes are refused by the checkpoint layer).
_REPORTED = ("train", "eval", "logging", "checkpoint", "data", "parallel")


def changed_settings(saved: dict[str, Any], cfg: Config) -> list[str]:
    ours = cfg.to_dict()
    out = []
    for section in _REPORTED:
        before, after = saved.get(section, {}), ours[section]
        for key, value in after.items():
            if key in before and before[key] != value:
                out.append(f"{section}.{key}: {before[key]!r} -> {value!r}")
    return out


def apply_optimizer_settings(engine: Any, cfg: Config) -> None:
    """The run's learning-rate schedule and AdamW settings from the resume point on (as Megatron's
    --override-opt_param-scheduler): loading a checkpoint restores the saved ones with the optimizer
    and scheduler state, which would silently keep the old lr, decay, betas and eps."""
    t = cfg.train
    scheduler = engine.lr_scheduler
    groups = torch_optimizer(engine).param_groups
    base = t.lr if t.lr > 0 else 1.0
    step = int(getattr(scheduler, "last_epoch", 0))  # steps taken: the next one's 0-based index
    for i, group in enumerate(groups):
        group.update(initial_lr=base, lr=lr_at(step, t), betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        if len(groups) == 2:  # parameter_groups(): [decayed matrices, no decay]
            group["weight_decay"] = t.weight_decay if i == 0 else 0.0
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [base] * len(scheduler.base_lrs)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        engine: Any,
        *,
        train_data: Any,
        valid_data: Any | None,
        test_data: Any | None,
        metrics: MetricsLogger,
        state: TrainState,
        num_params: int,
        peak_memory: PeakMemory | None = None,
        tokenizer_fingerprint: str | None = None,
        periodic_eval: PeriodicEval | None = None,
        diloco: DiLoCo | None = None,
    ) -> None:
        self.cfg = cfg
        self.diloco = diloco
        self.peak_memory = peak_memory
        self.periodic_eval = periodic_eval
        if periodic_eval is not None and engine.zero_optimization_stage() >= 3:
            raise ConfigError(
                "eval.lm_eval_tasks during training needs a ZeRO stage below 3 (rank 0 scores its whole "
                "model); run scripts/evaluate.py --tasks on the checkpoints instead"
            )
        self.ctx = ctx
        self.engine = engine
        self.train_data = train_data
        self.valid_data = valid_data
        self.test_data = test_data
        self.metrics = metrics
        self.state = state
        self.device = engine.device
        self.accum = cfg.grad_accumulation_steps(ctx.world_size)
        self.flops_per_token = model_flops_per_token(cfg.model, num_params)
        self.peak = gpu_peak_tflops()
        self.fp16 = resolve_precision(cfg.train.precision, cuda=torch.cuda.is_available()) == "fp16"
        self._bad_steps = 0
        self.stop_request = StopRequest()
        self.stop_request.install()
        LauncherWatch(self.stop_request).start()
        precision = resolve_precision(cfg.train.precision, cuda=torch.cuda.is_available())
        self.pipeline = ctx.pp > 1
        self._own_grad_norm = (
            engine.zero_optimization_stage() == 0 and precision == "fp32" and not self.pipeline
        )
        self._grad_norm: float | None = None
        self._lr = 0.0
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.spikes = SpikeDetector(cfg.train.spike_detection)
        self.spikes.restore(state.spike_history)  # a resumed run sees spikes from its first step
        self._skip_ranges = cfg.train.skip_ranges  # parsed once: looked at before every step

    # ----------------------------------------------------------------------------- batches
    def _batches(self, data: Any, consumed: int, total: int) -> Iterator[torch.Tensor]:
        sampler = GlobalBatchSampler(
            total_samples=total,
            consumed_samples=consumed,
            micro_batch_size=self.cfg.train.micro_batch_size,
            global_batch_size=self.cfg.train.global_batch_size,
            dp_rank=self.ctx.data_rank,  # with DiLoCo islands: island-major slices of every global batch
            dp_size=self.ctx.data_size,
        )
        for batch in make_loader(data, sampler, num_workers=self.cfg.data.num_workers):
            yield batch.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------- steps
    def _pipeline_step(self, batches: Iterator[torch.Tensor], inject: float | None) -> float:
        """PipelineEngine: one call runs all micro-batches; the loss comes back averaged over them and
        the data-parallel group, on every stage. An injected spike scales the loss inside the last
        stage's loss function, before backward (the loss function runs inside DeepSpeed's schedule)."""
        self._lr = float(self.engine.get_lr()[0])
        loss_fn = self.engine.module.loss_fn
        loss_fn.factor = inject
        try:
            loss = self.engine.train_batch(data_iter=_pairs(batches, self.cfg.data))
        finally:
            loss_fn.factor = None
        own = getattr(self.engine.optimizer, "last_grad_norm", None)  # ClippedAdamW (ZeRO 0)
        self._grad_norm = own if own is not None else _as_float(self.engine.get_global_grad_norm())
        return self.ctx.mean_over_islands(float(loss))

    def _train_step(self, batches: Iterator[torch.Tensor], inject: float | None) -> float:
        """One optimizer step over `accum` micro-batches; returns the loss averaged over the global batch.
        An injected spike (debug.inject_loss_spike_at) scales the loss before backward, so its
        gradients (NaN, or huge before clipping) reach the weights as a real spike's would."""
        losses = []
        self._lr = float(self.engine.get_lr()[0])
        for micro in range(self.accum):
            tokens = next(batches)  # (B, S + 1)
            loss = self.engine(*model_inputs(tokens, self.cfg.data))
            if inject is not None:
                loss = loss * inject
            self.engine.backward(loss)
            if micro == self.accum - 1 and self._own_grad_norm:
                # DeepSpeed reports no norm for ZeRO 0 in fp32; gradients are reduced by now.
                self._grad_norm = global_grad_norm(self.engine.module.parameters(), self.ctx)
            self.engine.step()
            losses.append(float(loss.detach()))
        if not self._own_grad_norm:
            self._grad_norm = _as_float(self.engine.get_global_grad_norm())
        return self.ctx.mean_over_dp([sum(losses) / len(losses)])[0]

    def _spike(self, loss: float) -> Spike | None:
        """A spike to recover from, or None. fp16's dynamic loss scaling skips non-finite steps itself
        (up to 20 in a row), as before."""
        if not math.isfinite(loss) and self.fp16:
            self._bad_steps += 1
            if self._bad_steps <= 20:
                return None
        elif math.isfinite(loss):
            self._bad_steps = 0
        return self.spikes.check(loss)

    def _stop_for(self, spike: Spike, why: str) -> TrainingError:
        it = self.state.iteration
        if spike.threshold is None:
            return TrainingError(
                f"loss is {spike.loss} at iteration {it}: training diverged{why}. Lower train.lr, raise "
                "train.lr_warmup_iters or use train.precision: bf16/fp32, then resume from the last checkpoint"
            )
        return TrainingError(
            f"{spike.describe()} at iteration {it}{why}. Lower train.lr, or relax train.spike_detection "
            "(window=0 reacts to non-finite losses only), then resume from the last checkpoint"
        )

    def _rollback(self, spike: Spike) -> Iterator[torch.Tensor]:
        """Reloads the latest checkpoint on every rank and skips the global batches from its position
        through the spiking one plus train.skip_batches_on_rollback; returns the new batch iterator."""
        cfg, G = self.cfg, self.cfg.train.global_batch_size
        if self.state.rollbacks >= cfg.train.max_rollbacks:
            raise self._stop_for(spike, f" (train.max_rollbacks = {cfg.train.max_rollbacks} rollbacks done)")
        if not complete_tags(Path(cfg.checkpoint_dir)):
            raise self._stop_for(spike, " and there is no checkpoint to roll back to")
        try:
            tag_dir = choose_verified(
                cfg.checkpoint_dir, self.ctx, fallback=True, checksums=cfg.checkpoint.verify
            )
        except CheckpointError as e:
            raise self._stop_for(spike, f" and no checkpoint can be reloaded ({e})") from None
        spike_at, skip_to = (
            self.state.iteration,
            self.state.consumed_samples + cfg.train.skip_batches_on_rollback * G,
        )
        saved, rng_state, _ = load_train_state(
            self.engine,
            tag_dir,
            cfg,
            self.ctx,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            diloco=self.diloco,
        )
        if rng_state is not None:
            restore_rng_state(rng_state, getattr(self.engine.module, "rng", None))
        skipped = skip_to - saved.consumed_samples
        self.state.iteration, self.state.consumed_samples = saved.iteration, skip_to
        self.state.skipped_samples = saved.skipped_samples + skipped
        self.state.rollbacks += 1
        self.spikes.restore(saved.spike_history)  # the window as it was at the checkpoint
        record = {"iteration": spike_at, "rollback": self.state.rollbacks, "spike_loss": spike.loss,
                  "spike_threshold": spike.threshold, "rollback_to_iteration": saved.iteration,
                  "checkpoint": str(tag_dir), "skipped_samples": skipped,
                  "skipped_sample_range": [saved.consumed_samples, skip_to]}  # fmt: skip
        self.metrics.log(record)
        logger.warning(
            "rollback %d/%d: %s at iteration %d; reloaded %s (iteration %d) and skipped samples [%d, %d) "
            "(%d global batches)", self.state.rollbacks, cfg.train.max_rollbacks, spike.describe(), spike_at,
            tag_dir, saved.iteration, saved.consumed_samples, skip_to, skipped // G,
        )  # fmt: skip
        return self._train_batches()

    def _skip_to(self) -> int | None:
        """The data position after the range of train.skip_batches that the next batch is in, or None."""
        G = self.cfg.train.global_batch_size
        batch = self.state.consumed_samples // G + 1  # numbered as the iteration that trains it uninterrupted
        ends = [last for first, last in self._skip_ranges if first <= batch <= last]
        return max(ends) * G if ends else None

    def _skip(self, skip_to: int) -> Iterator[torch.Tensor]:
        """Moves the data position to `skip_to` (train.skip_batches), as a rollback does; a new iterator."""
        G, start = self.cfg.train.global_batch_size, self.state.consumed_samples
        self.state.consumed_samples = skip_to
        self.state.skipped_samples += skip_to - start
        self.metrics.log({"iteration": self.state.iteration, "skipped_samples": skip_to - start,
                          "skipped_sample_range": [start, skip_to]})  # fmt: skip
        logger.info("train.skip_batches: skipped global batches %d-%d (samples [%d, %d)) before iteration %d",
                    start // G + 1, skip_to // G, start, skip_to, self.state.iteration + 1)  # fmt: skip
        return self._train_batches()

    def _train_batches(self) -> Iterator[torch.Tensor]:
        """From the data position through the samples of the remaining steps (the global batch size
        may have changed on resume, and rollbacks may have skipped samples)."""
        remaining = (self.cfg.train.train_iters - self.state.iteration) * self.cfg.train.global_batch_size
        return self._batches(
            self.train_data, self.state.consumed_samples, self.state.consumed_samples + remaining
        )

    @torch.no_grad()
    def evaluate(self, data: Any) -> float:
        total = self.cfg.eval.eval_iters * self.cfg.train.global_batch_size
        batches = self._batches(data, 0, total)
        if self.pipeline:
            pairs = _pairs(batches, self.cfg.data)
            losses = [float(self.engine.eval_batch(pairs)) for _ in range(self.cfg.eval.eval_iters)]
            # already averaged over micro-batches and the island's data-parallel ranks
            return self.ctx.mean_over_islands(sum(losses) / len(losses))
        self.engine.eval()
        losses = [float(self.engine(*model_inputs(t, self.cfg.data))) for t in batches]
        self.engine.train()
        return self.ctx.mean_over_dp([sum(losses) / max(1, len(losses))])[0]

    def _eval_record(self, data: Any, prefix: str) -> dict[str, Any]:
        loss = self.evaluate(data)
        return {
            "iteration": self.state.iteration,
            f"{prefix}_loss": loss,
            f"{prefix}_ppl": math.exp(min(loss, 50.0)),
            "consumed_samples": self.state.consumed_samples,
        }

    def _run_periodic_eval(self, iteration: int) -> None:
        """Rank 0 scores the live model (TP 1, PP 1, ZeRO < 3: it holds all of it); the others wait."""
        if self.ctx.rank == 0 and self.periodic_eval is not None:
            start = time.perf_counter()
            module = self.engine.module
            tracker = getattr(module, "rng", None)
            saved = rng_state(tracker)
            try:  # lm-eval seeds the global generators: training's random streams must not notice
                scores = self.periodic_eval(module, iteration)
            finally:
                restore_rng_state(saved, tracker)
                module.train()
            self.metrics.log(
                {"iteration": iteration, **scores, "lm_eval_seconds": time.perf_counter() - start}
            )
            logger.info(
                "lm-eval %6d | %s",
                iteration,
                " | ".join(f"{k.removeprefix('lm_eval/')} {v:.4f}" for k, v in scores.items()),
            )
        self.ctx.barrier()

    def _log_eval(self, data: Any | None, prefix: str = "val") -> None:
        if data is None:
            return
        record = self._eval_record(data, prefix)
        self.metrics.log(record)
        if prefix == "val":
            self.metrics.console(record, self.cfg.train.train_iters)
        else:
            logger.info("test   | test_loss %.4f | test_ppl %.2f", record["test_loss"], record["test_ppl"])

    def _step_record(self, losses: list[float], times: list[float]) -> dict[str, Any]:
        step_time = sum(times) / len(times)
        tokens = self.cfg.train.global_batch_size * self.cfg.model.seq_length
        record: dict[str, Any] = {
            "iteration": self.state.iteration,
            "loss": sum(losses) / len(losses),
            "lr": self._lr,
            "grad_norm": self._grad_norm,
            "tokens_per_sec": tokens / step_time,
            "step_time": step_time,
            "consumed_samples": self.state.consumed_samples,
        }
        if self.peak_memory is not None:
            peak = self.ctx.max_over_world(float(self.peak_memory.peak_bytes() or -1))
            record["peak_memory_gb"] = peak / 2**30 if peak >= 0 else None  # the largest of any rank
        if torch.cuda.is_available():
            tflops = self.flops_per_token * tokens / step_time / self.ctx.world_size / 1e12
            record["tflops_per_gpu"] = tflops
            record["mfu"] = tflops / self.peak if self.peak else None
            record["memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return record

    def _should_stop(self, iteration: int) -> bool:
        """A planned stop before train_iters: exit_interval (Megatron: iteration divisible by it) or
        SIGTERM/SIGUSR1 on any rank. The LR schedule is untouched: it follows train_iters."""
        if iteration >= self.cfg.train.train_iters:
            return False
        signalled = self.ctx.any_rank(self.stop_request.requested)
        interval = self.cfg.train.exit_interval
        if signalled or (interval and iteration % interval == 0):
            if signalled:
                self.state.stopped_by = self.stop_request.signal_name or "a stop signal on another rank"
            else:
                self.state.stopped_by = f"train.exit_interval={interval}"
            logger.info(
                "stopping at iteration %d (%s); saving a checkpoint", iteration, self.state.stopped_by
            )
            return True
        return False

    def _save(self) -> None:
        self.state.wandb_run_id = self.metrics.wandb_run_id or self.state.wandb_run_id
        self.state.spike_history = list(self.spikes.history)
        state = dict(asdict(self.state), tokenizer_fingerprint=self.tokenizer_fingerprint)
        start = time.perf_counter()
        rank_state = self.diloco.state_dict() if self.diloco is not None else None
        path = save_checkpoint(self.engine, self.cfg, state, ctx=self.ctx, rank_state=rank_state)
        seconds, size = time.perf_counter() - start, checkpoint_bytes(path)
        self.metrics.log({"iteration": self.state.iteration, "checkpoint_save_seconds": seconds,
                          "checkpoint_bytes": size})  # fmt: skip
        logger.info("saved checkpoint %s (%.1f MB in %.2f s)", path, size / 2**20, seconds)

    # -------------------------------------------------------------------------------- loop
    def train(self) -> TrainState:
        cfg = self.cfg
        batches = self._train_batches()
        stop_at = cfg.train.train_iters
        losses: list[float] = []
        times: list[float] = []
        saved_at = self.state.iteration  # nothing new to save if no step runs
        while self.state.iteration < stop_at:
            skip_to = self._skip_to()
            if skip_to is not None:
                batches = self._skip(skip_to)
            start = time.perf_counter()
            inject = injected_loss_factor(
                cfg.debug, self.state.consumed_samples // cfg.train.global_batch_size
            )
            step = self._pipeline_step if self.pipeline else self._train_step
            loss = step(batches, inject)
            times.append(time.perf_counter() - start)
            self.state.iteration += 1
            self.state.consumed_samples += cfg.train.global_batch_size
            spike = self._spike(loss)
            if spike is not None:  # before any save: a spiking state never becomes a checkpoint
                batches = self._rollback(spike)
                losses, times, saved_at = [], [], self.state.iteration
                continue
            losses.append(loss)
            it = self.state.iteration
            if self.diloco is not None:
                outer = self.diloco.after_step(it, final=it == cfg.train.train_iters)
                if outer is not None:
                    self.metrics.log({"iteration": it, **outer})
            if it % cfg.logging.log_interval == 0 or it == stop_at:
                record = self._step_record(losses, times)
                self.metrics.log(record)
                self.metrics.console(record, cfg.train.train_iters)
                losses, times = [], []
            if it % cfg.eval.eval_interval == 0 or it == cfg.train.train_iters:
                self._log_eval(self.valid_data)
            if self.periodic_eval is not None and (
                it % (cfg.eval.lm_eval_interval or cfg.eval.eval_interval) == 0 or it == cfg.train.train_iters
            ):
                self._run_periodic_eval(it)
            if cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
                self._save()
                saved_at = it
            if self._should_stop(it):
                break
        if saved_at != self.state.iteration:
            self._save()
        if self.state.iteration == cfg.train.train_iters:
            self._log_eval(self.test_data, "test")
        return self.state


def _as_float(x: Any) -> float | None:
    if x is None:
        return None
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def _pairs(batches: Iterator[torch.Tensor], data: DataConfig) -> Iterator[tuple[Any, torch.Tensor]]:
    """(B, S + 1) token batches -> (inputs, labels) as DeepSpeed's pipeline expects: the first stage
    reads the inputs (with document-aware training: ids, positions, doc ids; each passed on from
    stage to stage), the last the labels."""
    for tokens in batches:
        inputs, labels, *docs = model_inputs(tokens, data)
        assert inputs is not None and labels is not None
        if not docs:
            yield inputs.contiguous(), labels.contiguous()
            continue
        positions, doc_ids = docs
        if positions is None:
            positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
        if doc_ids is None:
            doc_ids = torch.zeros_like(inputs)
        yield (inputs.contiguous(), positions.contiguous(), doc_ids.contiguous()), labels.contiguous()
