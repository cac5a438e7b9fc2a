"""The mesh's process groups on 4 real gloo processes: each group of each kind holds the ranks the
documented order says (an all-reduce over it sums exactly those ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import spawn

pytestmark = [pytest.mark.distributed]


def _check_groups(rank: int, world: int) -> None:
    from llm.parallel.mesh import GROUP_AXES
    from llm.parallel.process_groups import ParallelContext

    for sizes in ({"tp": 2, "cp": 2}, {"tp": 1, "ep": 2}, {"pp": 2, "tp": 2}):
        ctx = ParallelContext.build(**sizes)
        for kind in GROUP_AXES:
            (mine,) = [g for g in ctx.mesh.groups(kind) if rank in g]
            assert ctx.groups[kind + "_ranks"] == mine, (sizes, kind)
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=ctx.groups[kind])
            assert t.item() == sum(mine), (sizes, kind, t.item(), mine)


def test_every_group_holds_the_documented_ranks_on_four_processes() -> None:
    spawn(_check_groups, 4)
