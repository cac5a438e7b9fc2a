"""The DeepSpeed config dict, derived from our config tree: batch sizes, precision, clipping,
optimizer, communication dtype; a user's DeepSpeed JSON may add ZeRO/offload knobs, and a value
that conflicts with one we derive is an error naming both. With it, the run's optimizer plan: who
builds the optimizer, who clips, who reports the gradient norm, decided once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llm.config import Config, ConfigError, TrainConfig, resolve_precision, validate_world
from llm.config.loading import merge_trees
from llm.config.schema import RunPrecision


def _check_fp8_device(cfg: Config, *, cuda: bool) -> None:
    """train.precision: fp8 runs on GPUs with FP8 tensor cores (compute capability 8.9: Ada; 9.0:
    Hopper; Blackwell), on CPU only for tests (debug.fp8_on_cpu)."""
    from llm.parallel.fp8 import fp8_available

    why = fp8_available("cuda" if cuda else "cpu")
    if why is None or (not cuda and cfg.debug.fp8_on_cpu):
        return
    raise ConfigError(
        f"train.precision: fp8 needs an NVIDIA GPU with FP8 tensor cores (H100/H200 or another of compute "
        f"capability 8.9 or newer), and {why}: use train.precision: bf16"
    )


def _derived_deepspeed(
    cfg: Config, world_size: int, precision: RunPrecision, *, cuda: bool
) -> dict[str, Any]:
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "train.precision: fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); use fp32 or bf16"
        )
    t = cfg.train
    return {
        "train_batch_size": cfg.deepspeed_batch_size(),  # DeepSpeed sees one island
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(world_size),
        "gradient_clipping": t.clip_grad,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": _optimizer_entry(t, cuda=cuda),
        **({"communication_data_type": comm} if (comm := cfg.parallel.communication_data_type) else {}),
    }


def _optimizer_entry(t: TrainConfig, *, cuda: bool) -> dict[str, Any]:
    if t.optimizer == "sgd":  # DeepSpeed builds torch.optim.<type> for names it does not know
        return {
            "type": "SGD",
            "params": {"lr": t.lr, "momentum": t.sgd_momentum, "weight_decay": t.weight_decay},
        }
    return {
        "type": "AdamW",
        "params": {
            "lr": t.lr,
            "betas": [t.adam_beta1, t.adam_beta2],
            "eps": t.adam_eps,
            "weight_decay": t.weight_decay,
            # torch's AdamW, with its fused CUDA kernel on a GPU: no DeepSpeed op compiled at start
            # (DeepSpeed's FusedAdam is a JIT nvcc build that needs a compiler on every node).
            "torch_adam": True,
            **({"fused": True} if cuda else {}),
        },
    }


_OWNED_KEYS = ("optimizer", "scheduler")


# ZeRO++ (stage 3): quantized weights (qwZ), quantized gradients (qgZ), hierarchical partitioning (hpZ).
_ZERO_PP = ("zero_quantized_weights", "zero_quantized_gradients", "zero_quantized_nontrainable_weights")


def _check_zero_stage_knobs(cfg: Config, ds: dict[str, Any], stage: int, *, cuda: bool) -> None:
    """ZeRO++ knobs in the JSON pass through on a GPU at stage 3; DiLoCo islands need ZeRO 0-2 (their
    outer step works on each rank's fp32 master weights)."""
    zero = ds["zero_optimization"]
    quantized = [k for k in _ZERO_PP if zero.get(k)] + (
        ["zero_hpz_partition_size"] if int(zero.get("zero_hpz_partition_size", 1)) > 1 else []
    )
    if quantized and not cuda:
        raise ConfigError(
            f"ZeRO++ ({', '.join(quantized)} in '{cfg.deepspeed_config}') needs CUDA kernels and cannot run on CPU; "
            "remove them, or compress gradients with parallel.communication_data_type: bf16"
        )
    if quantized and stage != 3:
        raise ConfigError(
            f"ZeRO++ ({', '.join(quantized)} in '{cfg.deepspeed_config}') works at ZeRO stage 3 only (this is stage "
            f"{stage}); use configs/deepspeed/zero3.json or remove them"
        )
    if cfg.parallel.diloco.islands > 1 and stage == 3:
        raise ConfigError(
            "parallel.diloco islands need ZeRO stage 0, 1 or 2 inside each island (stage 3 shards the weights "
            "the outer step updates); use configs/deepspeed/zero1.json or zero2.json"
        )


def _conflicts(user: Any, derived: Any, path: str) -> list[str]:
    if isinstance(user, dict) and isinstance(derived, dict):
        out: list[str] = []
        for key, value in user.items():
            if key in derived:
                out += _conflicts(value, derived[key], f"{path}.{key}" if path else key)
        return out
    if user == "auto" or user == derived:
        return []
    return [f"{path} = {user!r} (ours: {derived!r})"]


@dataclass(frozen=True)
class OptimizerPlan:
    """Who does what around the optimizer step, decided once per run (`deepspeed_setup`).

    - `optimizer_from`: "deepspeed" builds the optimizer the DeepSpeed dict names and clips at
      `gradient_clipping`; "llm" hands DeepSpeed llm's own clipped optimizer (llm.training.optim) and
      sets DeepSpeed's clipping to 0: at ZeRO 0 in fp32 (DeepSpeed's clipping there counts only the
      first pipeline stage's replicated parameters, averages the ranks' norms, and reports none), and
      for Muon always.
    - `grad_norm_from`: "deepspeed" (the engine's global norm) or "llm_optimizer" (the norm llm's
      optimizer clipped with).
    - `cp_grad_factor`: what the loss's gradient is multiplied by under context parallelism. Each CP
      rank's gradient is its part of the samples' gradient: the data-parallel reduction must sum the
      parts over CP and average over DP. DeepSpeed's plain engine at ZeRO 0-2 does (it knows CP as
      "sequence parallelism"); its pipeline engine (CP folded into its data axis: engine.pipeline_grid)
      and ZeRO 3's reduce-scatter divide by DP x CP, so there the gradient is scaled by CP."""

    precision: RunPrecision
    zero_stage: int
    pipeline: bool
    optimizer_from: Literal["deepspeed", "llm"]
    grad_norm_from: Literal["deepspeed", "llm_optimizer"]
    cp_grad_factor: int = 1

    @property
    def clipped_by(self) -> Literal["deepspeed", "llm"]:
        return self.optimizer_from


def _plan(cfg: Config, zero_stage: int, precision: RunPrecision) -> OptimizerPlan:
    pipeline = cfg.parallel.pipeline_model_parallel_size > 1
    plain_fp32 = zero_stage == 0 and precision == "fp32"
    # At ZeRO 0 in fp32 llm's optimizer clips: DeepSpeed's clipping there counts only the first pipeline
    # stage's parameters, averages the ranks' norms (wrong when expert-parallel ranks hold other
    # experts) and reports no norm (so it was computed twice); llm's computes the exact global norm once.
    own = plain_fp32 or cfg.train.optimizer == "muon"
    cp = cfg.parallel.context_parallel_size
    return OptimizerPlan(
        precision=precision, zero_stage=zero_stage, pipeline=pipeline,
        optimizer_from="llm" if own else "deepspeed",
        grad_norm_from="llm_optimizer" if own else "deepspeed",
        cp_grad_factor=cp if pipeline or zero_stage == 3 else 1,
    )  # fmt: skip


def build_deepspeed_config(cfg: Config, world_size: int, *, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed dict: the user's JSON (ZeRO/offload knobs) merged with the values we derive."""
    return deepspeed_setup(cfg, world_size, cuda=cuda)[0]


def deepspeed_setup(cfg: Config, world_size: int, *, cuda: bool) -> tuple[dict[str, Any], OptimizerPlan]:
    """The DeepSpeed dict and the optimizer plan that goes with it."""
    validate_world(cfg, world_size)
    user: dict[str, Any] = {}
    if cfg.deepspeed_config is not None:
        try:
            user = json.loads(Path(cfg.deepspeed_config).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed_config '{cfg.deepspeed_config}' is not valid JSON: {e}") from None
    for key in _OWNED_KEYS:
        if key in user:
            raise ConfigError(
                f"deepspeed_config '{cfg.deepspeed_config}' sets '{key}'; the optimizer and LR schedule come "
                "from the train.* settings: remove it from the JSON"
            )
    if cfg.train.precision == "fp8":
        _check_fp8_device(cfg, cuda=cuda)
    precision = resolve_precision(cfg.train.precision, cuda=cuda)
    derived = _derived_deepspeed(cfg, world_size, precision, cuda=cuda)
    problems = _conflicts(user, derived, "")
    if problems:
        raise ConfigError(
            f"deepspeed_config '{cfg.deepspeed_config}' conflicts with values derived from our config: "
            + "; ".join(problems)
            + ". Remove them from the JSON and set train.* (or parallel.communication_data_type) instead"
        )
    ds = merge_trees(user, derived)
    ds.setdefault("zero_optimization", {"stage": 0})
    offload = (ds["zero_optimization"].get("offload_optimizer") or {}).get("device", "none") in (
        "cpu",
        "nvme",
    )
    if offload and cuda and cfg.train.optimizer == "adamw":
        # The optimizer steps on the CPU copy: DeepSpeedCPUAdam (a C++ op) is far faster there.
        ds["optimizer"]["params"] = {k: v for k, v in ds["optimizer"]["params"].items() if k != "fused"}
        ds["optimizer"]["params"]["torch_adam"] = False
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"zero_optimization.stage = {stage!r} in '{cfg.deepspeed_config}'; use 0, 1, 2 or 3"
        )
    if stage >= 2 and cfg.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError(
            f"ZeRO stage {stage} ('{cfg.deepspeed_config}') is incompatible with pipeline parallelism "
            f"(pipeline_model_parallel_size = {cfg.parallel.pipeline_model_parallel_size}): use "
            "configs/deepspeed/zero1.json or zero0.json"
        )
    if stage == 0 and precision == "bf16" and cfg.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError(
            f"bf16 (train.precision: {cfg.train.precision}) with pipeline parallelism needs ZeRO stage 1 (this run: "
            + (f"stage 0 from '{cfg.deepspeed_config}'" if cfg.deepspeed_config else "stage 0, no deepspeed_config")
            + "): DeepSpeed's pipeline engine runs bf16 at stage 0 with gradients accumulated in bf16, which llm's "
            "checkpoints do not support; use configs/deepspeed/zero1.json (fp32 accumulation; also at one "
            "data-parallel rank)"
        )
    if stage == 3 and cfg.parallel.tensor_model_parallel_size > 1:
        raise ConfigError(
            "ZeRO stage 3 with tensor parallelism is not supported: use configs/deepspeed/zero1.json or "
            "zero2.json with parallel.tensor_model_parallel_size > 1"
        )
    _check_zero_stage_knobs(cfg, ds, stage, cuda=cuda)
    if cfg.model.is_moe and stage == 0 and precision != "fp32":
        raise ConfigError(
            f"a mixture of experts (model.num_experts) in {precision} needs ZeRO stage 1 or 2 (DeepSpeed's mixed-precision "
            "wrapper at stage 0 does not handle expert parameters): use configs/deepspeed/zero1.json"
        )
    if stage == 3 and cfg.model.is_moe:
        raise ConfigError(
            "ZeRO stage 3 with a mixture of experts (model.num_experts) is not supported: DeepSpeed partitions "
            "expert parameters over the expert-data-parallel group at stages 1 and 2; use configs/deepspeed/zero1.json "
            "or zero2.json"
        )
    if cfg.train.optimizer == "muon" and (stage != 0 or precision != "fp32"):
        raise ConfigError(
            f"train.optimizer: muon runs at ZeRO stage 0 in fp32 (this run: stage {stage}, {precision}): it "
            "orthogonalizes whole weight matrices, and DeepSpeed's ZeRO 1-3 and bf16/fp16 optimizers hand the optimizer "
            "flat partitions instead; use configs/deepspeed/zero0.json and train.precision: fp32, or train.optimizer: adamw"
        )
    if stage == 3 and cfg.parallel.context_parallel_size > 1:
        # ZeRO 3 divides the gradient sum by DP x CP on its reduce-scatter path (and by DP on its other
        # one): the reduce-scatter it is, and OptimizerPlan.cp_grad_factor makes up for the division
        if ds["zero_optimization"].get("reduce_scatter", True) is not True:
            raise ConfigError(
                f"zero_optimization.reduce_scatter: false in '{cfg.deepspeed_config}' with context parallelism "
                "(parallel.context_parallel_size > 1) at ZeRO stage 3 is not supported: remove it"
            )
        ds["zero_optimization"]["reduce_scatter"] = True
    plan = _plan(cfg, stage, precision)
    if plan.optimizer_from == "llm":  # DeepSpeed gets no optimizer entry and does not clip
        del ds["optimizer"]
        ds["gradient_clipping"] = 0.0
    if cfg.parallel.pipeline_model_parallel_size > 1 and cfg.model.sequence_parallel:
        # DeepSpeed splits stage-boundary activations across the TP group assuming they are replicated
        # there; under sequence parallelism each TP rank holds a different sequence shard.
        ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return ds, plan
