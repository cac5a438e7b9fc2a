"""Launcher detection (deepspeed, torchrun, srun, mpirun, mpiexec, python) and the layout report."""

from __future__ import annotations

import pytest

from llm.parallel.launcher import LaunchError, detect_launch, expand_nodelist
from llm.parallel.placement import build_placement
from llm.parallel.process_groups import ParallelContext


def test_slurm_nodelists_expand_like_scontrol() -> None:
    assert expand_nodelist("node07") == ["node07"]
    assert expand_nodelist("gpu[001-003,010]") == ["gpu001", "gpu002", "gpu003", "gpu010"]
    assert expand_nodelist("a[1-2],b5,c-[08-10]x") == ["a1", "a2", "b5", "c-08x", "c-09x", "c-10x"]
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist("gpu[5-3]")


def test_torchrun_and_deepspeed_variables() -> None:
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "GROUP_RANK": "2",
                "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}  # fmt: skip
    got = detect_launch(torchrun)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.node_rank) == ("torchrun", 5, 8, 1, 2)
    assert (got.master_addr, got.master_port) == ("10.0.0.1", 1234)
    ds = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "CROSS_RANK": "1", "MASTER_ADDR": "h0"}
    got = detect_launch(ds)
    assert (got.launcher, got.node_rank, got.master_port) == ("deepspeed", 1, 29500)


def test_srun_one_task_per_gpu() -> None:
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    got = detect_launch(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.node_rank) == ("srun", 9, 16, 1, 1)
    assert got.master_addr == "gpu017" and got.master_port == 20000 + 123456 % 10000
    # torchrun started by srun (one launcher per node): torchrun's own variables win
    got = detect_launch({**env, "RANK": "3", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu017", "GROUP_RANK": "0"})
    assert (got.launcher, got.rank) == ("torchrun", 3)
    # a batch script outside srun (no step) is one process, not rank 9 of 16
    batch = {k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert detect_launch(batch).world_size == 1


def test_mpi_launchers() -> None:
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "MASTER_ADDR": "n0"}  # fmt: skip
    got = detect_launch(ompi)
    assert (got.rank, got.world_size, got.local_rank, got.node_rank, got.master_addr) == (2, 4, 0, 1, "n0")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect_launch({k: v for k, v in ompi.items() if k != "MASTER_ADDR"})
    single_node = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    got = detect_launch(single_node)
    assert (got.launcher, got.rank, got.local_rank, got.master_addr) == (
        "mpiexec (MPICH/PMI)",
        1,
        1,
        "127.0.0.1",
    )


def test_plain_python_and_bad_values() -> None:
    got = detect_launch({})
    assert (got.launcher, got.rank, got.world_size) == ("python", 0, 1) and got.master_port > 0
    with pytest.raises(LaunchError, match="not an integer"):
        detect_launch({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(LaunchError, match="outside world size"):
        detect_launch({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h"})
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})


def test_layout_report_names_nodes_groups_and_cross_node_tp() -> None:
    ctx = ParallelContext(world_size=8, rank=0, tp=2, pp=2)
    everyone = [(r // 4, "hostA" if r < 4 else "hostB", r % 4) for r in range(8)]
    layout = build_placement(ctx, "torchrun", everyone)
    assert [n["ranks"] for n in layout.nodes] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.warnings == []
    text = layout.describe()
    assert (
        "2 node(s) x 4 rank(s) = world 8 = TP 2 x PP 2 x DP 2" in text and "node 1 (hostB): ranks 4-7" in text
    )
    # three ranks per node: the TP group [2, 3] straddles nodes 0 and 1
    odd = build_placement(
        ParallelContext(world_size=6, rank=0, tp=2), "srun", [(r // 3, "h", 0) for r in range(6)]
    )
    assert len(odd.warnings) == 1 and "[2, 3] spans nodes [0, 1]" in odd.warnings[0]
    # two "nodes" on one host (node ranks from the launcher) are still two nodes
    two = build_placement(ParallelContext(world_size=2, rank=0), "torchrun", [(0, "h", 0), (1, "h", 0)])
    assert len(two.nodes) == 2


def test_layout_of_diloco_islands() -> None:
    """Islands are the slowest axis: island k holds ranks [k S, (k + 1) S); every group but `island`
    stays inside one; an island spread over two nodes is flagged."""
    ctx = ParallelContext(world_size=8, rank=5, tp=2, islands=2)
    assert (ctx.island, ctx.dp, ctx.dp_rank, ctx.tp_rank, ctx.data_rank, ctx.data_size) == (1, 2, 0, 1, 2, 4)
    layout = build_placement(ctx, "srun", [(r // 4, f"h{r // 4}", r % 4) for r in range(8)])
    assert layout.groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]] and layout.groups["tp"][2] == [4, 5]
    assert layout.groups["island"] == [[0, 4], [1, 5], [2, 6], [3, 7]] and ctx.grid()["data"][1] == [
        1,
        3,
        5,
        7,
    ]
    assert "world 8 = 2 DiLoCo islands x TP 2 x PP 1 x DP 2" in layout.describe() and not layout.warnings
    spread = build_placement(ctx, "srun", [(r % 2, f"h{r % 2}", r // 2) for r in range(8)])
    assert any("DiLoCo island 0 (ranks 0-3) spans nodes [0, 1]" in w for w in spread.warnings)
