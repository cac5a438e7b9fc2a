"""DeepSpeed's engine around a model that training built: `deepspeed.initialize` (a plain engine, or
DeepSpeed's pipeline engine for a PipelineModule), with the warnings of the pinned versions that a
user cannot act on filtered once, at their source."""

from __future__ import annotations

import warnings
from typing import Any

from llm.engine.internals import undo_unfused_optimizer_init_step


def filter_known_warnings() -> None:
    """Warnings a user cannot act on, which the pinned torch and DeepSpeed print on every rank:
    - DeepSpeed 0.19.8's ZeRO calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor,
      deprecated in the pinned torch (a FutureWarning; DeepSpeed's to change);
    - its pipeline engine receives activations into a buffer by an in-place broadcast_ that autograd
      then walks (torch's "c10d::broadcast_: an autograd kernel was not registered" UserWarning); the
      engine sends the gradients back itself, and the pipeline tests show every layout computes what
      one process computes."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)  # fmt: skip
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered",
                            category=UserWarning)  # fmt: skip


def initialize_engine(
    model: Any, *, optimizer: Any, parameter_groups: list[dict[str, Any]], ds_config: dict[str, Any], lr_scheduler: Any,
    mpu: Any,
) -> Any:  # fmt: skip
    """The engine. `optimizer` None: DeepSpeed builds the one `ds_config` names; `mpu`: the DeepSpeed
    mpu protocol over our process groups (None for a PipelineModule, which brings its own grid)."""
    import deepspeed

    filter_known_warnings()
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage == 3 and mpu is not None and mpu.get_sequence_data_parallel_world_size() != mpu.get_data_parallel_world_size():
        # Context parallelism at ZeRO 3: DeepSpeed converts a model built outside zero.Init with its
        # parameters partitioned over the data-parallel group alone, and then reduces their gradients
        # over it: the CP ranks' parts would never be summed. Partitioned here over DP x CP instead.
        deepspeed.zero.Init(module=model, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                            config_dict_or_path=ds_config, mpu=mpu)  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=parameter_groups,  # type: ignore[arg-type]
        config=ds_config, lr_scheduler=lr_scheduler, mpu=mpu,
    )  # fmt: skip
    undo_unfused_optimizer_init_step(engine)
    if mpu is not None and mpu.get_sequence_data_parallel_world_size() == 1 and engine.zero_optimization_stage() == 0:
        # one data-parallel rank (and no context-parallel ones, whose gradients it sums): DeepSpeed's
        # ZeRO-0 gradient all-reduce would flatten, reduce over a group of one and copy back every
        # gradient each step, for nothing (a third of the host cost of
        # a tiny model's step, benchmarks/framework_overhead.py)
        engine.enable_backward_allreduce = False
    return engine
