"""The placement a run built (which ranks run on which nodes, and its TP/PP/DP groups), gathered once
and reported by rank 0 (the log's `layout:` line and the run directory's `layout.json`).

Every rank sends its host name, node rank (when the launcher gives one: two "nodes" started on one
machine are still two nodes) and local rank; rank 0 prints one summary and writes `layout.json`.
A tensor-parallel group that spans nodes is flagged: its all-reduces would run at every layer over
the network.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from llm.parallel.launcher import LaunchEnv
from llm.parallel.process_groups import ParallelContext

SHOWN_GROUPS = 4


@dataclass
class Placement:
    launcher: str
    world_size: int
    tp: int
    pp: int
    dp: int
    nodes: list[dict[str, Any]]
    groups: dict[str, list[list[int]]]
    warnings: list[str] = field(default_factory=list)
    islands: int = 1  # DiLoCo islands (TP x PP x DP is one island's)
    cp: int = 1  # context-parallel ranks (the sequence split across them)

    def to_dict(self) -> dict[str, Any]:
        return {
            "launcher": self.launcher, "world_size": self.world_size, "tp": self.tp, "pp": self.pp,
            "dp": self.dp, "cp": self.cp, "islands": self.islands, "nodes": self.nodes, "groups": self.groups,
            "warnings": self.warnings,
        }  # fmt: skip

    def describe(self) -> str:
        per_node = sorted({len(n["ranks"]) for n in self.nodes})
        ranks_per_node = str(per_node[0]) if len(per_node) == 1 else "/".join(map(str, per_node))
        islands = f"{self.islands} DiLoCo islands x " if self.islands > 1 else ""
        lines = [
            f"layout: {self.launcher}, {len(self.nodes)} node(s) x {ranks_per_node} rank(s) = world "
            f"{self.world_size} = {islands}TP {self.tp}{f' x CP {self.cp}' if self.cp > 1 else ''} x PP {self.pp} "
            f"x DP {self.dp}"
        ]
        for n in self.nodes[:8]:
            lines.append(f"  node {n['node']} ({n['host']}): ranks {_ranks(n['ranks'])}")
        if len(self.nodes) > 8:
            lines.append(f"  ... {len(self.nodes) - 8} more nodes")
        for kind in self.groups:
            groups = self.groups[kind]
            shown = " ".join(str(g) for g in groups[:SHOWN_GROUPS])
            more = f" ... ({len(groups)} in all)" if len(groups) > SHOWN_GROUPS else ""
            lines.append(f"  {kind.upper()} groups of {len(groups[0])}: {shown}{more}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def gather_placement(ctx: ParallelContext, launch: LaunchEnv) -> Placement:
    """Collective: every rank must call it. Returns the same Placement on every rank."""
    host = socket.gethostname()
    me = (launch.node_rank, host, launch.local_rank)
    everyone = ctx.all_gather_object(me)
    return build_placement(ctx, launch.launcher, everyone)


def build_placement(
    ctx: ParallelContext, launcher: str, everyone: list[tuple[int | None, str, int]]
) -> Placement:
    """The Placement from every rank's (node rank or None, host, local rank), in rank order."""
    node_of: dict[Any, int] = {}
    nodes: list[dict[str, Any]] = []
    rank_node: list[int] = []
    for rank, (node_rank, host, _) in enumerate(everyone):
        key = ("node", node_rank) if node_rank is not None else ("host", host)
        if key not in node_of:
            node_of[key] = len(nodes)
            nodes.append(
                {"node": node_rank if node_rank is not None else len(nodes), "host": host, "ranks": []}
            )
        nodes[node_of[key]]["ranks"].append(rank)
        rank_node.append(node_of[key])
    shown = ("tp", *(("cp",) if ctx.cp > 1 else ()), "pp", "dp", *(("island",) if ctx.islands > 1 else ()))
    groups: dict[str, list[list[int]]] = {kind: ctx.mesh.groups(kind) for kind in shown}
    warnings = [
        f"tensor-parallel group {g} spans nodes {sorted({nodes[rank_node[r]]['node'] for r in g})}: its "
        "all-reduces run at every layer over the network; use TP <= GPUs per node"
        for g in groups["tp"]
        if len({rank_node[r] for r in g}) > 1
    ][:SHOWN_GROUPS]
    warnings += [
        f"DiLoCo island {i} (ranks {_ranks(g)}) spans nodes {sorted({nodes[rank_node[r]]['node'] for r in g})}: "
        "DeepSpeed's all-reduces inside it cross the network every step; put each island on its own nodes"
        for i, g in enumerate(_islands(ctx))
        if ctx.islands > 1 and len({rank_node[r] for r in g}) > 1 and len(nodes) >= ctx.islands
    ][:SHOWN_GROUPS]
    return Placement(launcher, ctx.world_size, ctx.tp, ctx.pp, ctx.dp, nodes, groups, warnings, ctx.islands, ctx.cp)


def _islands(ctx: ParallelContext) -> list[list[int]]:
    return [list(range(i * ctx.island_size, (i + 1) * ctx.island_size)) for i in range(ctx.islands)]
