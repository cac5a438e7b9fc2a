"""ParallelContext: this process's place in the device mesh and the process groups made from it,
built once and passed explicitly. (Not to be confused with context parallelism, the `cp` axis: the
sequence split across ranks, llm/parallel/cp_attention.py. This module was `context.py` until context
parallelism arrived.)

The rank order and every group's ranks are the mesh's (mesh.py: island, pp, dp, cp, tp, slowest to
fastest; with CP 1 this is DeepSpeed's `PipeModelDataParallelTopology` order, tensor parallelism
fastest, so TP groups are runs of consecutive ranks on one node). DeepSpeed's `mpu` protocol over these
groups is an adapter in the seam (llm.engine.mpu).

DiLoCo islands (parallel.diloco) are the slowest axis: island k holds the global ranks
[k x S, (k + 1) x S), each island one such grid. Every group but two (and so DeepSpeed's all-reduce
and ZeRO) stays inside an island; `island` groups join the ranks at the same place in every island
(they hold the same parameter shard) and `data` groups join all ranks that read different data for
the same parameters (DP x islands). torch.distributed itself is set up in the DeepSpeed seam
(llm.engine.comm).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llm.parallel.mesh import GROUP_AXES, Mesh


def is_collective_timeout(error: BaseException) -> bool:
    """A torch.distributed collective that gave up waiting for another rank (gloo or NCCL)."""
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "Timed out waiting" in text or "collective operation timeout" in text
    )


@dataclass
class ParallelContext:
    """This process's place in the device mesh (mesh.py: the axes, the rank order, the groups' rank
    lists), the process groups made from it, and the few collectives the trainer needs. CP and EP have size 1 until context and expert parallelism use
    them; their groups exist already."""

    world_size: int
    rank: int
    tp: int = 1
    pp: int = 1
    groups: dict[str, Any] = field(default_factory=dict, repr=False)
    timeout: timedelta | None = None  # of the groups it creates (None: torch's default, 30 minutes)
    islands: int = 1  # DiLoCo islands: the slowest axis of the mesh
    cp: int = 1
    ep: int = 1
    cp_comm_type: str = "p2p"  # context parallelism: p2p (ring attention) or a2a (Ulysses)
    mesh: Mesh = field(init=False, repr=False)
    world_group: Any = field(default=None, repr=False)  # the world's collectives (None: the default group)
    host_group: Any = field(default=None, repr=False)  # NCCL runs: a gloo world group for host-side flags

    def __post_init__(self) -> None:
        self.mesh = Mesh.for_world(
            self.world_size, tp=self.tp, cp=self.cp, pp=self.pp, ep=self.ep, islands=self.islands
        )
        self._coords = self.mesh.coords(self.rank)

    @property
    def island_size(self) -> int:
        return self.world_size // self.islands

    @property
    def island(self) -> int:
        return self._coords["island"]

    @property
    def dp(self) -> int:
        """Data-parallel ranks inside one island (DeepSpeed's data-parallel world while CP is 1)."""
        return self.mesh.dp

    @property
    def tp_rank(self) -> int:
        return self._coords["tp"]

    @property
    def cp_rank(self) -> int:
        return self._coords["cp"]

    @property
    def dp_rank(self) -> int:
        return self._coords["dp"]

    @property
    def ep_rank(self) -> int:
        return self._coords["ep"]

    @property
    def pp_rank(self) -> int:
        return self._coords["pp"]

    @property
    def data_rank(self) -> int:
        """Which slice of every global batch this rank reads: islands x DP slices, island-major."""
        return self.island * self.dp + self.dp_rank

    @property
    def data_size(self) -> int:
        return self.islands * self.dp

    def coord_to_rank(self, *, pp: int, dp: int, tp: int, island: int = 0) -> int:
        return self.mesh.rank(pp=pp, dp=dp, tp=tp, island=island)

    @classmethod
    def single(cls) -> ParallelContext:
        """One process, no groups: every parallel layer is exactly the dense op."""
        return cls(world_size=1, rank=0)

    @classmethod
    def build(
        cls, *, tp: int = 1, pp: int = 1, islands: int = 1, cp: int = 1, ep: int = 1,
        timeout_minutes: float | None = None, cp_comm_type: str = "p2p",
    ) -> ParallelContext:  # fmt: skip
        """Creates every group of every kind (mesh.GROUP_AXES); all ranks must call this in the same
        order. Groups of the same ranks are made once and shared (dp_cp is dp while CP is 1)."""
        timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
        world = dist.get_world_size()
        ctx = cls(
            world_size=world,
            rank=dist.get_rank(),
            tp=tp,
            pp=pp,
            timeout=timeout,
            islands=islands,
            cp=cp,
            ep=ep,
            cp_comm_type=cp_comm_type,
        )
        if dist.get_backend() == "nccl":  # flags every step (stop requests) go over gloo: no GPU sync
            ctx.host_group = dist.new_group(backend="gloo", timeout=timeout)
        made: dict[tuple[int, ...], Any] = {}
        for name, lists in ctx.grid().items():
            for ranks in lists:
                key = tuple(ranks)
                if key not in made:
                    made[key] = (
                        dist.new_group(ranks, timeout=timeout) if len(ranks) < world else dist.group.WORLD
                    )
                if ctx.rank in ranks:
                    ctx.groups[name] = made[key]
                    ctx.groups[name + "_ranks"] = ranks
        return ctx

    def grid(self) -> dict[str, list[list[int]]]:
        """Every group of each kind as lists of global ranks (mesh.GROUP_AXES): tp, cp, dp, pp, ep,
        edp, dp_cp, mp (= pp x tp) inside each island; island (one rank per island, same place) and
        data (DP x islands: the slices of each global batch)."""
        return {kind: self.mesh.groups(kind) for kind in GROUP_AXES}

    def tp_subgroup(self, size: int) -> Any:
        """The group of `size` consecutive ranks inside this rank's TP group (created on first use;
        every rank must ask for the same sizes in the same order, as model construction does)."""
        key = f"tp_sub{size}"
        if key not in self.groups:
            if self.tp % size:
                raise ValueError(f"a TP subgroup of {size} ranks does not divide TP size {self.tp}")
            for tp_ranks in self.mesh.groups("tp"):
                for start in range(0, self.tp, size):
                    ranks = tp_ranks[start : start + size]
                    group = dist.new_group(ranks, timeout=self.timeout)
                    if self.rank in ranks:
                        self.groups[key] = group
        return self.groups[key]

    def describe(self) -> str:
        return self.mesh.describe()

    # ---- collectives the trainer needs (collectives live in llm/parallel only) ----------------
    def mean_over_dp(self, values: list[float]) -> list[float]:
        """The mean over every rank that read other samples for the same parameters: the island's DP
        group, and with DiLoCo islands every island's too (a loss over the whole global batch)."""
        return [float(x) for x in self._mean_over_data(torch.tensor(values, dtype=torch.float64)).cpu()]

    def mean_loss(self, loss: torch.Tensor) -> float:
        """`mean_over_dp` of a 0-dim loss that is still on its device: reduced there and read once (one
        host-device synchronisation)."""
        return float(self._mean_over_data(loss.detach().double()))

    def _mean_over_data(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over the ranks that read other samples (DP, and DiLoCo's islands), on the
        communication device."""
        if self.data_size == 1:
            return t
        t = t.to(_comm_device())
        dist.all_reduce(t, group=self.groups["data" if self.islands > 1 else "dp"])
        return t / self.data_size

    def mean_over_islands(self, value: float) -> float:
        """The mean of `value` over the islands (the ranks at this rank's place in each)."""
        if self.islands == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, group=self.groups["island"])
        return float(t.item()) / self.islands

    def max_over_world(self, value: float) -> float:
        """The largest `value` of any process."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def sum_over_world(self, values: list[float]) -> list[float]:
        """Sums (float64) over every process."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.world_size > 1:
            t = t.to(_comm_device())
            dist.all_reduce(t)
        return [float(x) for x in t.cpu()]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (one tiny all-reduce over the world)."""
        if self.world_size == 1:
            return flag
        group = self.world_group or self.host_group  # on the host where there is one (no device sync)
        device = torch.device("cpu") if group is not None else _comm_device()
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        dist.barrier(group=self.world_group)

    def for_background(self) -> ParallelContext:
        """This rank's context with the world's collectives on a gloo group of their own, for a thread
        that runs them while training runs its own (a background checkpoint write). A collective:
        every rank calls it, from its main thread."""
        other = copy.copy(self)
        if self.world_size > 1:
            other.world_group = dist.new_group(backend="gloo", timeout=self.timeout)
        return other

    def shutdown(self) -> None:
        """Every rank, at a normal end: meet, then tear the process groups down. A rank that exits
        while another still uses gloo can take its threads down mid-operation ("terminate called
        without an active exception", SIGABRT)."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def release(self) -> None:
        """On an error every rank stops at (a config mistake, an agreed save failure, a divergence):
        tear this rank's process groups down without meeting, so that their threads are stopped before
        the interpreter exits (left to interpreter shutdown, they abort the process now and then:
        "terminate called without an active exception")."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def first_failure(self, message: str | None) -> tuple[int, str] | None:
        """Every rank's `message` (None: this rank did not fail) gathered: (rank, message) of the lowest
        rank that failed, the same on every rank, or None when none did."""
        return next(((r, m) for r, m in enumerate(self.all_gather_object(message)) if m is not None), None)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.world_group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
