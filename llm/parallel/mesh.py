"""The device mesh: every parallel dimension as a named axis, the one place that says which global
rank sits where, and which ranks form each kind of process group.

Axes, slowest to fastest (a rank's global number is its coordinates in this order, the last one
varying fastest):

    island  DiLoCo islands (parallel.diloco.islands): each island an ordinary run; slow links between
    pp      pipeline stages
    dp      data-parallel replicas (within an island)
    cp      context parallelism: the sequence split over ranks
    tp      tensor parallelism: fastest, so a TP group is consecutive ranks (one node's fast links)

    rank = (((island * PP + pp) * DP + dp) * CP + cp) * TP + tp

Expert parallelism divides the data-parallel axis, as Megatron-Core and DeepSpeed do: the experts
of an MoE layer are spread over EP consecutive dp indices, and the replicas of each expert over the
DP / EP others:

    dp = edp * EP + ep

Groups (all ranks that differ only in the named axes): `tp`, `cp`, `pp`, `dp`, `ep`, `edp` (expert
data parallel), `dp_cp` (the gradient reduction of dense parameters: DP x CP, as Megatron folds CP
into it), `edp_cp` (the same for expert parameters: EDP x CP), `mp` (pp x tp within a replica: DeepSpeed's pipeline "model parallel" group), `island`
(one rank per island, same place) and `data` (island x dp: the slices of each global batch).
Everything here is rank arithmetic; process groups are made from these lists by ParallelContext.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AXES = ("island", "pp", "dp", "cp", "tp")
GROUP_AXES: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "pp": ("pp",),
    "dp": ("dp",),
    "ep": ("ep",),
    "edp": ("edp",),
    "dp_cp": ("dp", "cp"),
    "edp_cp": ("edp", "cp"),
    "cp_tp": ("cp", "tp"),
    "mp": ("pp", "tp"),
    "island": ("island",),
    "data": ("island", "dp"),
}
_SPLIT = ("island", "pp", "edp", "ep", "cp", "tp")  # dp written as edp, ep


def _split_axes(kind: str) -> set[str]:
    """The axes of _SPLIT a group kind varies (dp is edp and ep)."""
    return {a for axis in GROUP_AXES[kind] for a in (("edp", "ep") if axis == "dp" else (axis,))}


@dataclass(frozen=True)
class Mesh:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    islands: int = 1

    def __post_init__(self) -> None:
        for axis in ("tp", "cp", "pp", "dp", "ep", "islands"):
            if getattr(self, axis) < 1:
                raise ValueError(f"mesh axis {axis} = {getattr(self, axis)} must be at least 1")
        if self.dp % self.ep:
            raise ValueError(f"expert parallelism {self.ep} must divide the data-parallel size {self.dp}")

    @classmethod
    def for_world(
        cls, world_size: int, *, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1, islands: int = 1
    ) -> Mesh:
        """The mesh whose data-parallel size is what `world_size` leaves after the other axes."""
        rest = tp * cp * pp * islands
        if world_size % rest:
            raise ValueError(
                f"world size {world_size} is not divisible by islands x PP x CP x TP = {islands} x {pp} x {cp} x {tp}"
            )
        return cls(tp=tp, cp=cp, pp=pp, dp=world_size // rest, ep=ep, islands=islands)

    @property
    def world_size(self) -> int:
        return self.islands * self.pp * self.dp * self.cp * self.tp

    def _sizes(self) -> dict[str, int]:
        return {"island": self.islands, "pp": self.pp, "edp": self.dp // self.ep, "ep": self.ep,
                "cp": self.cp, "tp": self.tp}  # fmt: skip

    def coords(self, rank: int) -> dict[str, int]:
        """Every axis index of `rank` (with `dp` and its split into `edp`, `ep`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        sizes, out, rest = self._sizes(), {}, rank
        for axis in reversed(_SPLIT):
            out[axis] = rest % sizes[axis]
            rest //= sizes[axis]
        out["dp"] = out["edp"] * self.ep + out["ep"]
        return out

    def rank(self, **coords: int) -> int:
        """The global rank at these coordinates (axes not given: 0); `dp` or `edp`/`ep`, not both."""
        c = dict(coords)
        if "dp" in c:
            c["edp"], c["ep"] = divmod(c.pop("dp"), self.ep)
        sizes, out = self._sizes(), 0
        for axis in _SPLIT:
            value = c.get(axis, 0)
            if not 0 <= value < sizes[axis]:
                raise ValueError(f"mesh coordinate {axis} = {value} is outside 0..{sizes[axis] - 1}")
            out = out * sizes[axis] + value
        return out

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind (GROUP_AXES): each the ranks that differ only in its axes, in rank
        order; the groups in the order of their lowest rank."""
        varying = _split_axes(kind)
        out: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            key = tuple(c[a] for a in _SPLIT if a not in varying)
            out.setdefault(key, []).append(r)
        return sorted(out.values(), key=lambda g: g[0])

    def size(self, kind: str) -> int:
        sizes = self._sizes()
        return math.prod(sizes[a] for a in _split_axes(kind))

    def describe(self) -> str:
        parts = (
            [f"TP {self.tp}"]
            + ([f"CP {self.cp}"] if self.cp > 1 else [])
            + [f"PP {self.pp}", f"DP {self.dp}"]
        )
        parts += [f"(EP {self.ep})"] if self.ep > 1 else []
        grid = " x ".join(parts)
        return (
            f"world {self.world_size} = {self.islands} DiLoCo islands x {grid}"
            if self.islands > 1
            else f"world {self.world_size} = {grid}"
        )
