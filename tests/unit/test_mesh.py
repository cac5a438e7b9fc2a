"""The device mesh's rank arithmetic against its documented order, and DeepSpeed's pipeline topology
agreeing with it (pure arithmetic: no processes; the gloo check is tests/distributed/test_mesh.py)."""

from __future__ import annotations

import itertools

import pytest

from llm.parallel.mesh import Mesh


def _documented_rank(island: int, pp: int, dp: int, cp: int, tp: int, m: Mesh) -> int:
    return (((island * m.pp + pp) * m.dp + dp) * m.cp + cp) * m.tp + tp


def test_tp2_cp2_pp2_dp2_groups_hold_the_documented_ranks() -> None:
    m = Mesh.for_world(16, tp=2, cp=2, pp=2)
    assert (m.dp, m.world_size) == (2, 16)
    for pp, dp, cp, tp in itertools.product(range(2), repeat=4):
        r = _documented_rank(0, pp, dp, cp, tp, m)
        assert m.rank(pp=pp, dp=dp, cp=cp, tp=tp) == r
        c = m.coords(r)
        assert (c["pp"], c["dp"], c["cp"], c["tp"], c["island"]) == (pp, dp, cp, tp, 0)
    assert m.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert m.groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert m.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert m.groups("pp") == [[r, r + 8] for r in range(8)]
    assert m.groups("dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert m.groups("mp") == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    for kind in ("tp", "cp", "dp", "pp", "dp_cp", "mp", "ep", "edp", "island", "data"):
        groups = m.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(16)), kind  # a partition of the world
        assert {len(g) for g in groups} == {m.size(kind)}, kind


def test_expert_parallelism_divides_the_data_parallel_axis() -> None:
    m = Mesh(tp=2, dp=8, ep=4)
    # experts over 4 consecutive dp indices (ranks 2 apart: TP 2), their replicas over the other 2
    assert m.groups("ep")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert m.groups("edp")[:2] == [[0, 8], [1, 9]]
    assert m.coords(10) == {"island": 0, "pp": 0, "edp": 1, "ep": 1, "cp": 0, "tp": 0, "dp": 5}
    with pytest.raises(ValueError, match="expert parallelism 3 must divide the data-parallel size 8"):
        Mesh(dp=8, ep=3)


def test_islands_are_the_slowest_axis() -> None:
    m = Mesh.for_world(8, tp=2, islands=2)
    assert m.groups("island") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert m.groups("data") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert m.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with pytest.raises(ValueError, match="not divisible by islands x PP x CP x TP = 2 x 1 x 1 x 3"):
        Mesh.for_world(8, tp=3, islands=2)


def test_deepspeeds_pipeline_topology_agrees() -> None:
    """The pipeline's DeepSpeed topology (pipe, data, model) over the same ranks, with CP folded into its
    data axis as the gradient reduction needs: its groups are the mesh's pp, dp_cp and tp."""
    from llm.engine.pipeline_grid import pipeline_topology
    from llm.parallel.process_groups import ParallelContext

    m = Mesh.for_world(16, tp=2, cp=2, pp=2)
    topo = pipeline_topology(ParallelContext(world_size=16, rank=0, tp=2, cp=2, pp=2))
    assert sorted(topo.get_axis_comm_lists("pipe")) == m.groups("pp")
    assert sorted(topo.get_axis_comm_lists("data")) == m.groups("dp_cp")
    assert sorted(topo.get_axis_comm_lists("model")) == m.groups("tp")
    for r in range(16):
        c = m.coords(r)
        assert topo.get_rank(pipe=c["pp"], data=c["dp"] * m.cp + c["cp"], model=c["tp"]) == r
