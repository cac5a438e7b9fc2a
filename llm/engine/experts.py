"""Expert parameters in DeepSpeed's terms, so that its engine reduces and partitions them over the
expert-data-parallel group (and everything else over the data-parallel group), as for its own MoE:

- each expert parameter (llm marks them `expert_parallel`, llm/model/moe.py) gets DeepSpeed's tags:
  `allreduce = False` and `group_name = "ep_size_<EP>"`;
- the mesh's `ep` and `edp_cp` groups (`edp` without context parallelism) are registered under that
  name (internals.register_expert_groups);
- the optimizer's parameter groups are split into dense and expert groups (`moe: True`), which ZeRO
  1-2 partition over the expert-data-parallel group;
- the engine learns that the model has MoE layers from an instance of DeepSpeed's MoE layer class in
  the module tree: `ExpertMarker`, which has no parameters and no experts of its own. DeepSpeed's
  per-expert checkpoint files therefore stay empty; llm saves the expert shards itself
  (llm/checkpoint/engine.py), and the model-states file of data-parallel rank 0 holds everything else.

DeepSpeed divides the summed expert gradients by the whole data-parallel size: each expert's gradient
already sums the contributions of every EP rank's tokens, so the result is the data-parallel mean.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llm.engine.internals import register_expert_groups
from llm.parallel.process_groups import ParallelContext

MARKER = "deepspeed_moe_marker"


def _marker_class() -> type[nn.Module]:
    from deepspeed.moe.layer import MoE

    class ExpertMarker(MoE):  # type: ignore[misc]
        """Tells DeepSpeed's engine that the model has expert parameters; computes nothing."""

        def __init__(self, group_name: str, ep: int, num_experts: int) -> None:
            nn.Module.__init__(self)  # not MoE's: it would build DeepSpeed's own experts
            self.expert_group_name, self.ep_size = group_name, ep
            self.num_experts, self.num_local_experts = num_experts, 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The groups are the mesh's, registered already (DeepSpeed's would be built here)."""

        def forward(self, *args: Any) -> Any:
            raise RuntimeError("the expert marker is not a layer")

    return ExpertMarker


def register_experts(model: nn.Module, groups: list[dict[str, Any]], ctx: ParallelContext,
                     *, num_experts: int) -> list[dict[str, Any]]:  # fmt: skip
    """Tags the expert parameters of `model`, registers the groups, adds the marker; returns the
    optimizer's parameter groups split into dense and expert groups. A dense model, or EP 1 (every rank
    holds every expert: they are ordinary replicated parameters): `groups` as given, nothing registered."""
    experts = [p for p in model.parameters() if getattr(p, "expert_parallel", False)]
    if not experts or ctx.ep == 1:
        return groups
    name = f"ep_size_{ctx.ep}"
    for p in experts:
        p.allreduce = False  # type: ignore[attr-defined]
        p.group_name = name  # type: ignore[attr-defined]
    # the expert-data-parallel group spans CP too: CP ranks' expert gradients are parts to be summed
    register_expert_groups(name, ep=(ctx.groups["ep"], ctx.groups["ep_ranks"]),
                           edp=(ctx.groups["edp_cp"], ctx.groups["edp_cp_ranks"]))  # fmt: skip
    model.add_module(MARKER, _marker_class()(name, ctx.ep, num_experts))
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"group{i}", **g} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)  # type: ignore[no-any-return]
