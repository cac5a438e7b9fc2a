"""Pretraining, wired: distributed setup, tokenizer, model, DeepSpeed engine, data, resume, loop."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from llm.config import Config, ConfigError, replace_validated, validate_world
from llm.data.gpt_dataset import GPTDataset
from llm.data.identity import data_identity
from llm.data.loader import ContinuedDataset, SplitSizes, build_datasets, check_token_files
from llm.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from llm.engine.build import initialize_engine
from llm.engine.comm import init_distributed
from llm.engine.deepspeed_config import OptimizerPlan, deepspeed_setup
from llm.engine.experts import register_experts
from llm.engine.mpu import MeshMPU
from llm.errors import LLMError, on_every_rank
from llm.model.gpt import build_model, count_parameters, parameter_groups
from llm.parallel.layers import use_fp8
from llm.parallel.placement import gather_placement
from llm.parallel.process_groups import ParallelContext, is_collective_timeout
from llm.parallel.random import RNGTracker
from llm.training.diloco import DiLoCo
from llm.training.lr_schedule import make_scheduler
from llm.training.memory import PeakMemory
from llm.training.metrics import MetricsLogger
from llm.training.muon import muon_parameter_groups
from llm.training.optim import clipped_optimizer
from llm.training.resume import ResumePoint, resume, resume_source
from llm.training.run_dir import RunDirectoryError, check_run_directory, check_writable, run_directories
from llm.training.run_lock import RunLock, RunLockedError
from llm.training.signals import StopRequest
from llm.training.state import TrainState
from llm.training.steps import Steps, make_steps
from llm.training.trainer import PeriodicEval, Trainer

logger = logging.getLogger("llm")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_vocab(cfg: Config) -> Config:
    """The config with model.vocab_size (and, for document-aware training, data.eod_token_id) taken
    from the tokenizer (a new, validated config; the given one is not changed); a model vocabulary
    smaller than the tokenizer's is an error."""
    if cfg.data.tokenizer is None:
        if cfg.model.vocab_size is None:
            raise ConfigError("set data.tokenizer (or model.vocab_size) so the vocabulary size is known")
        return cfg
    tok = load_tokenizer(cfg.data.tokenizer)
    size = tok.vocab_size
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's ({size})"
        )
    if cfg.data.document_aware and cfg.data.eod_token_id is None:  # documents end with the EOS
        cfg = replace_validated(cfg, data=dataclasses.replace(cfg.data, eod_token_id=tok.eos_id))
    if cfg.model.vocab_size is not None:
        return cfg
    return replace_validated(cfg, model=dataclasses.replace(cfg.model, vocab_size=size))


def _check_token_range(data: Any, vocab_size: int) -> None:
    """Catches data made with another tokenizer (ids beyond the vocabulary) before the first step."""
    first = data.datasets[0] if hasattr(data, "datasets") else data
    if isinstance(first, GPTDataset):
        head = np.asarray(first.data.tokens[: 1 << 20])
        if head.size and int(head.max()) >= vocab_size:
            raise ConfigError(
                f"'{first.data.prefix}' holds token id {int(head.max())} >= vocabulary size {vocab_size}: "
                "it was made with another tokenizer; preprocess it with data.tokenizer"
            )


def write_effective_config(cfg: Config, ds_config: dict[str, Any]) -> None:
    directory = Path(cfg.logging.dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (directory / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))


class CollectiveTimeoutError(LLMError, RuntimeError):
    """Another rank stopped answering (hung, stopped or dead) for longer than parallel.timeout_minutes."""

    # The process group's threads still wait on the dead peer; tearing them down at interpreter exit
    # can abort the process (std::terminate, status -6): the entry script leaves at once instead.
    exit_at_once = True


def _timeout_message(cfg: Config, ctx: ParallelContext, iteration: int, error: BaseException) -> str:
    cause = str(error).strip().splitlines()[0].split("] ")[-1]
    return (
        f"rank {ctx.rank}: a collective gave up after parallel.timeout_minutes = {cfg.parallel.timeout_minutes} "
        f"during iteration {iteration + 1} ({cause}): another rank is hung, stopped or dead. This rank stops so "
        "that the launcher's restarts (torchrun --max-restarts) or the scheduler's requeue can resume the run"
    )


def _check_inputs(cfg: Config, ctx: ParallelContext) -> None:
    """Before the model is built (minutes for a large one): every rank looks for its token files and
    the checkpoint named by checkpoint.resume (node-local data may be missing on one node only); all
    raise the first failing rank's error (named by rank unless every rank failed alike), printed once."""
    failure: tuple[type[LLMError], str] | None = None
    try:
        check_token_files(cfg.data)
        resume_source(cfg)
    except LLMError as e:
        failure = (type(e), str(e))
    failures = ctx.all_gather_object(failure)
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if failed:
        rank, (kind, text) = failed[0]
        everywhere = len(failed) == ctx.world_size and len({f[1] for _, f in failed}) == 1
        raise on_every_rank(kind(text if everywhere else f"rank {rank}: {text}"))


class CompileFailedError(LLMError, RuntimeError):
    """torch.compile could not build the transformer blocks (model.compile): a failure of torch's compiler
    for this model, device and precision, not of the config; the eager model is the same model."""


def _compile_failure(cfg: Config, ctx: ParallelContext, error: BaseException) -> CompileFailedError | None:
    """A CompileFailedError for `error` when it comes from torch's compiler (dynamo or inductor) under
    model.compile; the compiler's whole output (often thousands of lines) goes to a file of the run."""
    if not cfg.model.compile or not type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return None
    path = Path(cfg.logging.dir) / f"compile_error_rank{ctx.rank:05d}.txt"
    try:
        path.write_text("".join(traceback.format_exception(error)))
        where = f"The compiler's output: {path}"
    except OSError:
        where = "Its output could not be written to the run directory"
    cause = (str(error).strip().splitlines() or [""])[0][:200]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rank = f"rank {ctx.rank}: " if ctx.world_size > 1 else ""
    hint = "; on a CPU, fp32 is also the faster precision" if device == "cpu" and cfg.train.precision != "fp32" else ""
    return CompileFailedError(
        f"{rank}model.compile: torch.compile failed to build the transformer blocks ({type(error).__name__}: "
        f"{cause}) on {device}, train.precision={cfg.train.precision}, torch {torch.__version__}: a failure in "
        "torch's compiler or the toolchain it uses (a C++ compiler on a CPU, Triton on a GPU), not in the config. "
        f"Set model.compile=false: the same model, eager{hint}. {where}"
    )


def _datasets(cfg: Config) -> tuple[Any, Any, Any]:
    """Train (continued with a reshuffle of the same data if rollbacks skip batches), valid, test."""
    gbs = cfg.train.global_batch_size
    planned = cfg.train.batch_schedule.samples_before(cfg.train.train_iters)  # every step's global batch
    sizes = SplitSizes(planned, cfg.eval.eval_iters * gbs, cfg.eval.eval_iters * gbs)
    kw = {"seq_length": cfg.model.seq_length, "seed": cfg.train.seed}
    train, valid, test = build_datasets(cfg.data, sizes=sizes, **kw)

    def more() -> Any:
        logger.info(
            "the planned training samples are used up (batches were skipped): continuing on a reshuffle"
        )
        return build_datasets(
            cfg.data, sizes=SplitSizes(sizes.train, 0, 0), **{**kw, "seed": cfg.train.seed + 1}
        )[0]

    return ContinuedDataset(train, more), valid, test


def run_pretraining(
    cfg: Config, *, stop: StopRequest | None = None, peak_memory: PeakMemory | None = None,
    periodic_eval: PeriodicEval | None = None,
) -> TrainState:  # fmt: skip
    """The whole run on this process. `stop`: the stop request the entry point listens with (signals,
    the launcher watch; scripts/pretrain.py sets them up); None: only exit_interval stops early.
    `peak_memory` measures the `peak_memory_gb` metric (default: `PeakMemory`; benchmarks pass their
    own to leave out the interpreter's memory on CPU). `periodic_eval(model, iteration)` ->
    {metric: value} runs on rank 0 every eval.lm_eval_interval iterations and at the end
    (scripts/pretrain.py passes lm-eval's, built from eval.lm_eval_tasks; training does not import eval)."""
    launch = init_distributed(timeout_minutes=cfg.parallel.timeout_minutes)
    setup_logging(launch.rank)
    try:  # before building groups: a bad TP x PP is one clear line
        validate_world(cfg, launch.world_size)
    except ConfigError as e:
        raise on_every_rank(e) from None
    ctx = ParallelContext.build(
        tp=cfg.parallel.tensor_model_parallel_size, pp=cfg.parallel.pipeline_model_parallel_size,
        islands=cfg.parallel.diloco.islands, ep=cfg.parallel.expert_model_parallel_size,
        cp=cfg.parallel.context_parallel_size, cp_comm_type=cfg.parallel.cp_comm_type,
        timeout_minutes=cfg.parallel.timeout_minutes,
    )  # fmt: skip
    lock = _claim_run(cfg, ctx)  # before anything is written into the run directory
    try:
        placement = gather_placement(ctx, launch)
        cfg = resolve_vocab(cfg)
        _check_inputs(cfg, ctx)  # before the model is built
        ds_config, plan = deepspeed_setup(cfg, launch.world_size, cuda=torch.cuda.is_available())
        if ctx.rank == 0:
            logger.info("%s", placement.describe())

        def write_run_files() -> None:  # once the resume is settled: a refused one leaves them as they were
            if ctx.rank == 0:
                write_effective_config(cfg, ds_config)
                (Path(cfg.logging.dir) / "layout.json").write_text(json.dumps(placement.to_dict(), indent=2))

        steps, num_params = build_engine(cfg, ctx, ds_config, plan)
        state = _train(cfg, ctx, steps, num_params, stop or StopRequest(), peak_memory or PeakMemory(),
                       periodic_eval, write_run_files)  # fmt: skip
    except LLMError as e:
        if not getattr(e, "exit_at_once", False):  # a hung peer's threads cannot be torn down: exit at once
            ctx.release()
        raise
    finally:
        if lock is not None:
            lock.release()
    ctx.shutdown()
    return state


def _claim_run(cfg: Config, ctx: ParallelContext) -> RunLock | None:
    """Every directory the run writes is probed (rank 0 all, every other rank the checkpoint
    directory, where it writes too); then rank 0 locks the run and checkpoint directories and checks
    that they are this run's to write (run_dir.py). Every rank stops when any of it fails."""
    probe_error = None
    try:
        for setting, path in run_directories(cfg).items():
            if ctx.rank == 0 or setting == "checkpoint.dir":
                check_writable(path, setting)
    except RunDirectoryError as e:
        probe_error = str(e)
    found = ctx.first_failure(probe_error)
    if found is not None:
        rank, message = found
        raise on_every_rank(RunDirectoryError(f"rank {rank}: {message}" if rank else message))
    lock, failed = None, None
    if ctx.rank == 0:
        lock = RunLock([Path(cfg.logging.dir), Path(cfg.checkpoint_dir)], force=cfg.checkpoint.break_lock)
        try:
            lock.acquire()
            check_run_directory(cfg)
        except (RunLockedError, RunDirectoryError) as e:
            failed = e
            if isinstance(e, RunDirectoryError):
                lock.release()
    if ctx.any_rank(failed is not None):
        raise failed or on_every_rank(
            RunLockedError("the run directory cannot be used (rank 0's message says why)")
        )
    return lock


def switch_to_fp8(model: torch.nn.Module, ctx: ParallelContext) -> None:
    """train.precision: fp8: the model's linear layers to FP8 matmuls (llm.parallel.layers.use_fp8), or
    one ConfigError naming the first layer whose dimensions FP8 GEMMs cannot take."""
    problems = use_fp8(model, ctx)
    if problems:
        raise ConfigError(
            f"train.precision: fp8 needs the linear layers' dimensions in multiples of 16 (FP8 GEMMs): "
            f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + "; choose model.hidden_size, model.ffn_hidden_size and model.num_attention_heads (with experts also "
            "model.moe_ffn_hidden_size and model.moe_shared_expert_intermediate_size) so that each rank's share is"
            " a multiple of 16, or use train.precision: bf16"
        )


def build_engine(
    cfg: Config, ctx: ParallelContext, ds_config: dict[str, Any], plan: OptimizerPlan
) -> tuple[Steps, int]:
    """The model (plain, or a PipelineModule when pipeline > 1) inside DeepSpeed's engine, behind the
    one step interface; the optimizer is DeepSpeed's or llm's as the plan says."""
    seed_everything(cfg.train.seed)
    rng = RNGTracker()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng.seed(seed=cfg.train.seed, tp_rank=ctx.tp_rank, pp_rank=ctx.pp_rank, device=device)
    if plan.pipeline:
        from llm.model.pipeline import build_pipeline_model

        model: torch.nn.Module = build_pipeline_model(cfg, ctx, rng)
    else:
        model = build_model(cfg.model, seed=cfg.train.seed, ctx=ctx, rng=rng)
    if cfg.train.precision == "fp8":
        switch_to_fp8(model, ctx)
    num_params = count_parameters(model)
    logger.info("model: %s, %.2fM parameters on this rank; %s", cfg.model.architecture, num_params / 1e6,
                ctx.describe())  # fmt: skip
    if cfg.train.optimizer == "muon":
        groups = muon_parameter_groups(model, cfg.train, cfg.model.num_layers)
    else:
        groups = parameter_groups(model, cfg.train.weight_decay)
    if cfg.model.is_moe:  # expert parameters reduced and partitioned over the expert-data-parallel group
        groups = register_experts(model, groups, ctx, num_experts=int(cfg.model.num_experts or 0))
    engine = initialize_engine(
        model,
        optimizer=clipped_optimizer(groups, cfg.train, ctx) if plan.optimizer_from == "llm" else None,
        parameter_groups=groups,
        ds_config=ds_config,
        lr_scheduler=make_scheduler(cfg.train),
        mpu=None
        if plan.pipeline
        else MeshMPU(ctx),  # a PipelineModule brings its own grid (same rank layout)
    )
    return make_steps(engine, cfg, ctx, plan, rng), num_params


def _train(
    cfg: Config, ctx: ParallelContext, steps: Steps, num_params: int, stop: StopRequest, peak_memory: PeakMemory,
    periodic_eval: PeriodicEval | None, write_run_files: Callable[[], None],
) -> TrainState:  # fmt: skip
    diloco = (
        DiLoCo(cfg.parallel.diloco, ctx, steps.engine, num_layers=cfg.model.num_layers)
        if ctx.islands > 1
        else None
    )
    peak_memory.reset()  # peak_memory_gb in the metrics: the model and optimizer, plus what training adds
    state, point = TrainState(), None
    fingerprint = tokenizer_fingerprint(cfg.data.tokenizer)
    identity = data_identity(cfg.data, seed=cfg.train.seed)
    source = resume_source(cfg)
    if source is not None:
        point = resume(steps, source, cfg, ctx, fallback=cfg.checkpoint.resume == "auto", diloco=diloco,
                       tokenizer_fingerprint=fingerprint, data_identity=identity)  # fmt: skip
        state = point.state
        _report_resume(cfg, point)
    state.data_identity = identity  # what the checkpoints of this run record from now on
    write_run_files()
    train, valid, test = _datasets(cfg)
    _check_token_range(train, int(cfg.model.vocab_size or 0))
    metrics = MetricsLogger(cfg, enabled=ctx.rank == 0, run_id=state.wandb_run_id,
                            start=(state.iteration, state.consumed_samples))  # fmt: skip
    if point is not None:
        metrics.log({"iteration": state.iteration, "resumed_from": str(point.tag_dir)})
        if point.changes:
            _record_changes(cfg, metrics, state.iteration, point.changes, rank=ctx.rank)
    trainer = Trainer(
        cfg, ctx, steps, train_data=train, valid_data=valid, test_data=test, metrics=metrics, state=state,
        num_params=num_params, stop=stop, peak_memory=peak_memory, tokenizer_fingerprint=fingerprint,
        periodic_eval=periodic_eval, diloco=diloco,
    )  # fmt: skip
    if point is not None:  # last, after everything that might draw random numbers during setup
        steps.restore_rng(point.rng_state)
    try:
        return trainer.train()
    except RuntimeError as e:
        failed = _compile_failure(cfg, ctx, e)
        if failed is not None:
            raise failed from None
        if not is_collective_timeout(e):
            raise
        raise CollectiveTimeoutError(_timeout_message(cfg, ctx, trainer.state.iteration, e)) from None
    finally:
        metrics.finish()


def _report_resume(cfg: Config, point: ResumePoint) -> None:
    logger.info("resumed from %s at iteration %d", point.tag_dir, point.state.iteration)
    if point.state.iteration >= cfg.train.train_iters:
        logger.warning(
            "nothing to train: the checkpoint is at iteration %d, train.train_iters = %d. To train on, raise "
            "train.train_iters; to start a new run, set logging.dir to a new directory", point.state.iteration,
            cfg.train.train_iters,
        )  # fmt: skip
    for change in point.changes:
        logger.info("resume: %s", change)


def _record_changes(
    cfg: Config, metrics: MetricsLogger, iteration: int, changes: list[str], *, rank: int
) -> None:
    """Settings changed on resume: a metrics record, and a line in the run's config_history.jsonl."""
    metrics.log({"iteration": iteration, "resume_changes": changes, "resume_changed_settings": len(changes)})
    if rank == 0:
        with (Path(cfg.logging.dir) / "config_history.jsonl").open("a") as f:
            f.write(json.dumps({"iteration": iteration, "changes": changes}) + "\n")
