"""DeepSpeed's pipeline grid over llm's mesh: inside DiLoCo islands, and with context parallelism.

`PipelineModule` builds its process groups from a topology over the whole world, with llm's rank
order (mesh.py). Context parallelism is folded into DeepSpeed's data axis, as Megatron folds CP into
its data-parallel group: DeepSpeed's data groups are DP x CP, so the gradient all-reduce (ZeRO 0),
ZeRO 1's partitions and the loss average span them. DeepSpeed then divides the gradient sum by DP x CP
where CP ranks' gradients are parts of the same samples' (to be divided by DP only): the pipeline
loss scales its gradient by CP to make up (`PipelineLoss`), and DeepSpeed is told a batch of CP times
the samples (`Config.deepspeed_batch_size`). Only CP rank 0 of DP rank 0 writes the layer files.

With DiLoCo islands (the slowest axis of llm's rank grid) the topology gets an `island` axis in front
of DeepSpeed's (pipe, data, model), so its data, pipe and model groups stay inside an island. Two
places of DeepSpeed assume its three axes are the whole world, and are set right here:

- the "model parallel" group it builds (all ranks of one data index) would join the same data
  index of every island: it becomes the island's TP x PP group (gradient norms, overflow checks);
- tied-weight groups (input and output embeddings on the first and last stage) are created by each
  rank for its own island only, while `new_group` must be called by every rank with the same
  ranks in the same order: they are created for every island, in island order.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch.distributed as dist

from llm.parallel.process_groups import ParallelContext


def pipeline_topology(ctx: ParallelContext) -> Any:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, ProcessTopology

    if ctx.islands == 1:
        return PipeModelDataParallelTopology(num_pp=ctx.pp, num_mp=ctx.tp, num_dp=ctx.dp * ctx.cp)
    return ProcessTopology(
        axes=["island", "pipe", "data", "model"], dims=[ctx.islands, ctx.pp, ctx.dp * ctx.cp, ctx.tp]
    )


@cache
def pipeline_module_class() -> type:
    """DeepSpeed's PipelineModule whose tied-weight groups are built for every island."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    class IslandPipelineModule(PipelineModule):  # type: ignore[misc]
        def _index_tied_modules(self) -> dict[str, Any]:
            topo = self._topo
            if "island" not in topo.get_axis_names():
                return dict(super()._index_tied_modules())
            comms: dict[str, Any] = {}
            if topo.get_dim("pipe") == 1:
                return comms
            specs = self._layer_specs
            for key in sorted({s.key for s in specs if isinstance(s, TiedLayerSpec)}):
                stages = sorted(
                    {
                        self.stage_owner(i)
                        for i, s in enumerate(specs)
                        if isinstance(s, TiedLayerSpec) and s.key == key
                    }
                )
                for island in range(topo.get_dim("island")):
                    for data in range(topo.get_dim("data")):
                        for model in range(topo.get_dim("model")):
                            ranks = [
                                topo.get_rank(island=island, pipe=s, data=data, model=model) for s in stages
                            ]
                            group = dist.new_group(ranks=ranks)
                            if self.global_rank in ranks:
                                comms[key] = {"ranks": ranks, "group": group, "weight_attr": self.tied_weight_attrs[key],
                                              "module": self.tied_modules[key]}  # fmt: skip
                                if self.global_rank != ranks[0]:  # counted once (gradient norms)
                                    for p in self.tied_modules[key].parameters():
                                        p.ds_pipe_replicated = True
            return comms

    return IslandPipelineModule


def keep_model_group_in_island(module: Any, ctx: ParallelContext) -> None:
    """The grid's model-parallel group becomes the island's TP x PP group."""
    if ctx.islands > 1:
        grid = module._grid
        grid.ds_model_proc_group = ctx.groups["mp"]
        grid.ds_model_world_size = ctx.tp * ctx.pp
        grid.ds_model_rank = ctx.groups["mp_ranks"].index(ctx.rank)
