"""DeepSpeed's `mpu` protocol over the mesh's process groups: what `deepspeed.initialize(mpu=...)`
calls, so that ZeRO shards over the data-parallel group only and gradient-norm clipping counts a
tensor-sharded parameter once. A PipelineModule brings its own grid instead (engine.pipeline_grid)."""

from __future__ import annotations

from typing import Any

from llm.parallel.process_groups import ParallelContext


class MeshMPU:
    """As in Megatron-DeepSpeed, "model parallel" means tensor parallel here: DeepSpeed counts a
    parameter without `tensor_model_parallel` once per model-parallel group (on its rank 0) and sums
    norms over that group; the pipeline engine handles stages itself."""

    def __init__(self, ctx: ParallelContext) -> None:
        self.ctx = ctx

    def get_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp

    def get_model_parallel_group(self) -> Any:
        return self.ctx.groups["tp"]

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp

    def get_data_parallel_group(self) -> Any:
        return self.ctx.groups["dp"]

    def get_pipe_parallel_rank(self) -> int:
        return self.ctx.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.ctx.pp

    def get_pipe_parallel_group(self) -> Any:
        return self.ctx.groups["pp"]

    # Context parallelism is DeepSpeed's "sequence parallelism": it sums gradients over DP x CP and
    # divides by DP (each CP rank's gradient is its part of the samples'), and ZeRO shards over DP x CP.
    def get_sequence_parallel_group(self) -> Any:
        return self.ctx.groups["cp"]

    def get_sequence_parallel_world_size(self) -> int:
        return self.ctx.cp

    def get_sequence_parallel_rank(self) -> int:
        return self.ctx.cp_rank

    def get_sequence_data_parallel_group(self) -> Any:
        return self.ctx.groups["dp_cp"]

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.ctx.dp * self.ctx.cp

    def get_sequence_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank * self.ctx.cp + self.ctx.cp_rank

    # Megatron's names for the same (DeepSpeed asks for either)
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size
    get_pipeline_model_parallel_group = get_pipe_parallel_group
