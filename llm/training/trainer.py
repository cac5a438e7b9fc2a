"""The training loop: steps through the engine's one interface (`steps.py`), evaluation, metrics,
checkpoints, rollbacks after loss spikes (through the one resume path, `resume.py`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint.format import CheckpointError, checkpoint_bytes, complete_tags
from llm.checkpoint.rng import restore_rng_state, rng_state
from llm.config import Config, ConfigError
from llm.data.loader import GlobalBatchSampler, make_loader
from llm.errors import LLMError
from llm.model.flops import gpu_peak_tflops, model_flops_per_token
from llm.parallel.process_groups import ParallelContext
from llm.training.diloco import DiLoCo
from llm.training.faults import Spike, SpikeDetector, injected_loss_factor
from llm.training.memory import PeakMemory
from llm.training.metrics import MetricsLogger
from llm.training.profile import StepProfiler
from llm.training.resume import resume
from llm.training.signals import StopRequest
from llm.training.state import TrainState
from llm.training.steps import Steps

logger = logging.getLogger("llm")


class TrainingError(LLMError, RuntimeError):
    """Training cannot go on (for example a non-finite loss); the message says where and why."""


# (model, iteration) -> {"lm_eval/<task>/<metric>": value}; see run_pretraining
PeriodicEval = Callable[[torch.nn.Module, int], dict[str, float]]


class Trainer:
    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        steps: Steps,
        *,
        train_data: Any,
        valid_data: Any | None,
        test_data: Any | None,
        metrics: MetricsLogger,
        state: TrainState,
        num_params: int,
        stop: StopRequest,
        peak_memory: PeakMemory | None = None,
        tokenizer_fingerprint: str | None = None,
        periodic_eval: PeriodicEval | None = None,
        diloco: DiLoCo | None = None,
    ) -> None:
        """`stop`: the run's stop request (signals and the launcher watch, set up by the entry point),
        looked at on every iteration boundary."""
        self.cfg = cfg
        self.diloco = diloco
        self.peak_memory = peak_memory
        self.periodic_eval = periodic_eval
        if periodic_eval is not None and steps.plan.zero_stage >= 3:
            raise ConfigError(
                "eval.lm_eval_tasks during training needs a ZeRO stage below 3 (rank 0 scores its whole "
                "model); run scripts/evaluate.py --tasks on the checkpoints instead"
            )
        self.ctx = ctx
        self.steps = steps
        self.train_data = train_data
        self.valid_data = valid_data
        self.test_data = test_data
        self.metrics = metrics
        self.state = state
        self.stop_request = stop
        self.flops_per_token = model_flops_per_token(cfg.model, num_params)
        self.peak = gpu_peak_tflops()
        self._bad_steps = 0
        self._grad_norm: float | torch.Tensor | None = None  # maybe a device tensor, read when logged
        self._lr = 0.0
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.spikes = SpikeDetector(cfg.train.spike_detection)
        self.spikes.restore(state.spike_history)  # a resumed run sees spikes from its first step
        self._skip_ranges = cfg.train.skip_ranges  # parsed once: looked at before every step
        log = cfg.logging
        self.profiler = StepProfiler(log.profile_step_start, log.profile_step_end, rank=ctx.rank,
                                     ranks=log.profile_ranks, out_dir=Path(log.dir) / "profile")  # fmt: skip

    # ----------------------------------------------------------------------------- batches
    def _batches(
        self, data: Any, consumed: int, total: int, sizes: Callable[[int], int] | None = None
    ) -> Iterator[torch.Tensor]:
        sampler = GlobalBatchSampler(
            total_samples=total,
            consumed_samples=consumed,
            micro_batch_size=self.cfg.train.micro_batch_size,
            global_batch_size=self.cfg.train.global_batch_size,
            dp_rank=self.ctx.data_rank,  # with DiLoCo islands: island-major slices of every global batch
            dp_size=self.ctx.data_size,
            batch_sizes=sizes,
        )
        for batch in make_loader(data, sampler, num_workers=self.cfg.data.num_workers):
            yield batch.to(self.steps.device, non_blocking=True)

    # ------------------------------------------------------------------------------- steps
    def _spike(self, loss: float) -> Spike | None:
        """A spike to recover from, or None. fp16's dynamic loss scaling skips non-finite steps itself
        (up to 20 in a row), as before."""
        if not math.isfinite(loss) and self.steps.plan.precision == "fp16":
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
        cfg, batches = self.cfg, self.cfg.train.batch_schedule
        self._await_background()  # the checkpoint being written may be the one to roll back to
        if self.state.rollbacks >= cfg.train.max_rollbacks:
            raise self._stop_for(spike, f" (train.max_rollbacks = {cfg.train.max_rollbacks} rollbacks done)")
        if not complete_tags(Path(cfg.checkpoint_dir)):
            raise self._stop_for(spike, " and there is no checkpoint to roll back to")
        spike_at, skip_to = self.state.iteration, self.state.consumed_samples
        if cfg.train.skip_batches_on_rollback:
            skip_to = batches.samples_before(
                batches.iteration_at(skip_to) + cfg.train.skip_batches_on_rollback
            )
        try:
            point = resume(self.steps, cfg.checkpoint_dir, cfg, self.ctx, fallback=True, diloco=self.diloco,
                           tokenizer_fingerprint=self.tokenizer_fingerprint, data_identity=self.state.data_identity or {})  # fmt: skip
        except CheckpointError as e:
            raise self._stop_for(spike, f" and no checkpoint can be reloaded ({e})") from None
        self.steps.restore_rng(point.rng_state)
        saved, tag_dir = point.state, point.tag_dir
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
            tag_dir, saved.iteration, saved.consumed_samples, skip_to,
            batches.iteration_at(skip_to) - batches.iteration_at(saved.consumed_samples),
        )  # fmt: skip
        return self._train_batches()

    def _skip_to(self) -> int | None:
        """The data position after the range of train.skip_batches that the next batch is in, or None."""
        batches = self.cfg.train.batch_schedule
        batch = (
            batches.iteration_at(self.state.consumed_samples) + 1
        )  # numbered as the iteration that trains it uninterrupted
        ends = [last for first, last in self._skip_ranges if first <= batch <= last]
        return batches.samples_before(max(ends)) if ends else None

    def _skip(self, skip_to: int) -> Iterator[torch.Tensor]:
        """Moves the data position to `skip_to` (train.skip_batches), as a rollback does; a new iterator."""
        batches, start = self.cfg.train.batch_schedule, self.state.consumed_samples
        self.state.consumed_samples = skip_to
        self.state.skipped_samples += skip_to - start
        self.metrics.log({"iteration": self.state.iteration, "skipped_samples": skip_to - start,
                          "skipped_sample_range": [start, skip_to]})  # fmt: skip
        logger.info("train.skip_batches: skipped global batches %d-%d (samples [%d, %d)) before iteration %d",
                    batches.iteration_at(start) + 1, batches.iteration_at(skip_to), start, skip_to, self.state.iteration + 1)  # fmt: skip
        return self._train_batches()

    def _train_batches(self) -> Iterator[torch.Tensor]:
        """From the data position through the samples of the remaining steps (the global batch size
        may have changed on resume, and rollbacks may have skipped samples); with a batch ramp-up the
        k-th global batch is the one of iteration `iteration + k`."""
        batches, it = self.cfg.train.batch_schedule, self.state.iteration
        remaining = batches.samples_before(self.cfg.train.train_iters) - batches.samples_before(it)
        start = self.state.consumed_samples
        return self._batches(self.train_data, start, start + remaining, lambda k: batches.size_of(it + k))

    def evaluate(self, data: Any) -> float:
        iters = self.cfg.eval.eval_iters
        return self.steps.evaluate(self._batches(data, 0, iters * self.cfg.train.global_batch_size), iters)

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
            module, tracker = self.steps.module, self.steps.rng
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

    def _step_record(self, losses: list[float], times: list[float], sizes: list[int]) -> dict[str, Any]:
        step_time = sum(times) / len(times)
        tokens = sum(sizes) / len(sizes) * self.cfg.model.seq_length  # per step, over the steps logged
        record: dict[str, Any] = {
            "iteration": self.state.iteration,
            "loss": sum(losses) / len(losses),
            "lr": self._lr,
            "grad_norm": None if self._grad_norm is None else float(self._grad_norm),  # read only here
            "tokens_per_sec": tokens / step_time,
            "step_time": step_time,
            "consumed_samples": self.state.consumed_samples,
        }
        if self.cfg.train.rampup_batch_size:
            record["global_batch_size"] = sizes[-1]
        record.update(self.steps.moe_metrics())  # MoE: auxiliary losses, load, drops (nothing for a dense model)
        if self.peak_memory is not None:
            peak = self.ctx.max_over_world(float(self.peak_memory.peak_bytes() or -1))
            record["peak_memory_gb"] = peak / 2**30 if peak >= 0 else None  # the largest of any rank
        if torch.cuda.is_available():
            tflops = self.flops_per_token * tokens / step_time / self.ctx.world_size / 1e12
            record["tflops_per_gpu"] = tflops
            record["mfu"] = tflops / self.peak if self.peak else None
            record["memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return record

    def _signalled(self) -> bool:
        """SIGTERM / SIGUSR1 / SIGINT or a vanished launcher on any rank (sets `stopped_by`)."""
        if not self.ctx.any_rank(self.stop_request.requested):
            return False
        self.state.stopped_by = self.stop_request.signal_name or "a stop signal on another rank"
        return True

    def _should_stop(self, iteration: int) -> bool:
        """A planned stop before train_iters: exit_interval (Megatron: iteration divisible by it) or
        a stop signal on any rank. The LR schedule is untouched: it follows train_iters."""
        if iteration >= self.cfg.train.train_iters:
            return False
        interval = self.cfg.train.exit_interval
        if self._signalled() or (interval and iteration % interval == 0):
            self.state.stopped_by = self.state.stopped_by or f"train.exit_interval={interval}"
            logger.info(
                "stopping at iteration %d (%s); saving a checkpoint", iteration, self.state.stopped_by
            )
            return True
        return False

    def _save(self) -> None:
        start = time.perf_counter()  # from before the wait: a write longer than the interval stalls here
        self._await_background()  # at most one save in flight
        self.state.wandb_run_id = self.metrics.wandb_run_id or self.state.wandb_run_id
        self.state.spike_history = list(self.spikes.history)
        state = dict(asdict(self.state), tokenizer_fingerprint=self.tokenizer_fingerprint)
        rank_state = self.diloco.state_dict() if self.diloco is not None else None
        path = self.steps.save(state, rank_state)
        seconds = time.perf_counter() - start
        if self.steps.background is not None:  # checkpoint.async_save: the rest happens in the writer thread
            self.steps.background.blocked(self.state.iteration, seconds)
            logger.info("checkpoint %s: copying and writing in the background", path)
            return
        size = checkpoint_bytes(path)
        self.metrics.log({"iteration": self.state.iteration, "checkpoint_save_seconds": seconds,
                          "checkpoint_bytes": size})  # fmt: skip
        logger.info("saved checkpoint %s (%.1f MB in %.2f s)", path, size / 2**20, seconds)

    def _background_copied(self) -> None:
        """Logs how long training waited for the save in flight, once its host copy is taken: the wait
        for the save before it, the save call, and the optimizer step's wait for the copy (also in
        that step's time)."""
        bg = self.steps.background
        block = bg.take_block() if bg is not None else None
        if block is not None:
            self.metrics.log({"iteration": block[0], "checkpoint_block_seconds": block[1]})
            logger.info("checkpoint at iteration %d: state copied, training waited %.2f s", *block)

    def _background_saved(self) -> None:
        """Logs the background save that just finished (its time and size)."""
        bg = self.steps.background
        assert bg is not None and bg.tag_dir is not None
        path, seconds = Path(bg.tag_dir), float(bg.seconds or 0.0)
        size = checkpoint_bytes(path)
        self.metrics.log({"iteration": int(path.name.split("_")[-1]), "checkpoint_write_seconds": seconds,
                          "checkpoint_bytes": size})  # fmt: skip
        logger.info("saved checkpoint %s (%.1f MB, written in the background in %.2f s)", path, size / 2**20, seconds)

    def _await_background(self) -> None:
        """Until the save in flight is complete (raises its failure, agreed by every rank)."""
        bg = self.steps.background
        if bg is None:
            return
        finished = bg.wait()
        self._background_copied()
        if finished:
            self._background_saved()

    def _poll_background(self) -> None:
        """At every step boundary: a failed background save stops every rank here, in the same
        iteration (the flag is agreed by all ranks); a finished one is logged."""
        bg = self.steps.background
        if bg is None:
            return
        if self.ctx.any_rank(bg.failed):
            bg.wait()  # raises the CheckpointSaveError every rank's writer agreed on
        self._background_copied()
        if bg.finished():
            self._background_saved()

    # -------------------------------------------------------------------------------- loop
    def train(self) -> TrainState:
        cfg = self.cfg
        batches = self._train_batches()
        stop_at = cfg.train.train_iters
        losses: list[float] = []
        times: list[float] = []
        sizes: list[int] = []  # the global batch of each step since the last log line
        schedule = cfg.train.batch_schedule
        saved_at = self.state.iteration  # nothing new to save if no step runs
        if (
            saved_at < stop_at and self._signalled()
        ):  # during the setup (the entry point listens from its start)
            logger.info("stopping before the first step (%s): nothing new to save", self.state.stopped_by)
            return self.state
        while self.state.iteration < stop_at:
            skip_to = self._skip_to()
            if skip_to is not None:
                batches = self._skip(skip_to)
            start = time.perf_counter()
            batch = schedule.size_of(self.state.iteration)
            inject = injected_loss_factor(cfg.debug, schedule.iteration_at(self.state.consumed_samples))
            self.profiler.before_step(self.state.iteration + 1)
            self.steps.profiling = self.profiler.active
            self.profiler.step_began()
            result = self.steps.train(batches, inject, batch)
            loss, self._grad_norm, self._lr = result.loss, result.grad_norm, result.lr
            times.append(time.perf_counter() - start)
            self.profiler.after_step(self.state.iteration + 1)  # writing the profile is not the step's time
            sizes.append(batch)
            self.state.iteration += 1
            self.state.consumed_samples += batch
            spike = self._spike(loss)
            if spike is not None:  # before any save: a spiking state never becomes a checkpoint
                batches = self._rollback(spike)
                losses, times, sizes, saved_at = [], [], [], self.state.iteration
                continue
            losses.append(loss)
            it = self.state.iteration
            if self.diloco is not None:
                outer = self.diloco.after_step(it, final=it == cfg.train.train_iters)
                if outer is not None:
                    self.metrics.log({"iteration": it, **outer})
            self._poll_background()
            stopping = self._should_stop(it)  # first: the steps since the last log line are logged on a stop
            if it % cfg.logging.log_interval == 0 or it == stop_at or stopping:
                record = self._step_record(losses, times, sizes)
                self.metrics.log(record)
                self.metrics.console(record, cfg.train.train_iters)
                losses, times, sizes = [], [], []
            if it % cfg.eval.eval_interval == 0 or it == cfg.train.train_iters:
                self._log_eval(self.valid_data)
            if self.periodic_eval is not None and (
                it % (cfg.eval.lm_eval_interval or cfg.eval.eval_interval) == 0 or it == cfg.train.train_iters
            ):
                self._run_periodic_eval(it)
            if cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
                self._save()
                saved_at = it
            if stopping:
                break
        if saved_at != self.state.iteration:
            self._save()
        self._await_background()  # the last checkpoint is complete before the run ends
        if self.state.iteration == cfg.train.train_iters:
            self._log_eval(self.test_data, "test")
        return self.state
