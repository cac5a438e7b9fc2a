"""Which launcher started this process, and the rank, world size and rendezvous it implies.

One code path for every way users start training:

| launcher                               | rank / world / local rank                          | node rank          |
|----------------------------------------|----------------------------------------------------|--------------------|
| `deepspeed` (pdsh, `--no_ssh`, local)  | RANK, WORLD_SIZE, LOCAL_RANK (+ CROSS_RANK)        | CROSS_RANK         |
| `torchrun`                             | RANK, WORLD_SIZE, LOCAL_RANK (+ TORCHELASTIC_*)    | GROUP_RANK         |
| `srun` (one task per GPU)              | SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID  | SLURM_NODEID       |
| `mpirun` (Open MPI)                    | OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}             | OMPI_COMM_WORLD_NODE_RANK |
| `mpiexec` (MPICH, Intel MPI)           | PMI_RANK, PMI_SIZE, MPI_LOCALRANKID                | -                  |
| plain `python`                         | one process, private loopback rendezvous           | -                  |

Explicit RANK/WORLD_SIZE (set by deepspeed and torchrun) win over MPI variables, which win over
SLURM's (an `mpirun` inside an allocation also sees SLURM variables of its own daemons). The
rendezvous address is MASTER_ADDR when set; under srun the first host of the step's node list;
under a one-node mpirun the loopback. MASTER_PORT defaults to 29500, under SLURM to a port derived
from the job id so two jobs sharing a node do not collide.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from llm.errors import LLMError

DEFAULT_PORT = 29500


class LaunchError(LLMError, ValueError):
    """The launcher's environment is incomplete or contradictory; the message says what to set."""


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    node_rank: int | None
    master_addr: str
    master_port: int

    def export(self, environ: MutableMapping[str, str]) -> None:
        """Writes the variables torch.distributed's env:// rendezvous reads."""
        environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name)
        if value is not None and value.strip() != "":
            try:
                return int(value)
            except ValueError:
                raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands SLURM's compressed host list: 'gpu[001-003,007],login-[1-2]x' -> gpu001 ... login-2x."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_ranges(part[1:-1], nodelist))
            elif part:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for piece in spec.split(","):
        if "-" in piece:
            lo, hi = piece.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise LaunchError(f"cannot read the SLURM node list {whole!r} (range {piece!r})")
            out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
        elif piece:
            out.append(piece)
    return out


def _slurm_port(environ: Mapping[str, str]) -> int:
    job = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    return DEFAULT_PORT if job is None else 20000 + job % 10000


def _port(environ: Mapping[str, str], fallback: int) -> int:
    port = _int(environ, "MASTER_PORT")
    return fallback if port is None else port


def _from_torch_env(environ: Mapping[str, str]) -> LaunchEnv:
    if "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ:
        launcher, node = "torchrun", _int(environ, "GROUP_RANK")
    elif "CROSS_RANK" in environ:
        launcher, node = "deepspeed", _int(environ, "CROSS_RANK")
    else:
        launcher, node = "env", _int(environ, "NODE_RANK", "GROUP_RANK")
    if "MASTER_ADDR" not in environ:
        raise LaunchError(
            "RANK and WORLD_SIZE are set but MASTER_ADDR is not: set MASTER_ADDR (and MASTER_PORT)"
        )
    return LaunchEnv(
        launcher=launcher,
        rank=_int(environ, "RANK") or 0,
        world_size=_int(environ, "WORLD_SIZE") or 1,
        local_rank=_int(environ, "LOCAL_RANK") or 0,
        node_rank=node,
        master_addr=environ["MASTER_ADDR"],
        master_port=_port(environ, DEFAULT_PORT),
    )


def _mpi_master(environ: Mapping[str, str], world: int, local_size: int | None, name: str) -> str:
    if "MASTER_ADDR" in environ:
        return environ["MASTER_ADDR"]
    if local_size is not None and local_size == world:
        return "127.0.0.1"
    raise LaunchError(
        f"started by {name} across several nodes without MASTER_ADDR: pass rank 0's host, "
        "e.g. mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ..."
    )


def _from_openmpi(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "OMPI_COMM_WORLD_SIZE") or 1
    local_size = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
    return LaunchEnv(
        launcher="mpirun (Open MPI)",
        rank=_int(environ, "OMPI_COMM_WORLD_RANK") or 0,
        world_size=world,
        local_rank=_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK") or 0,
        node_rank=_int(environ, "OMPI_COMM_WORLD_NODE_RANK"),
        master_addr=_mpi_master(environ, world, local_size, "mpirun"),
        master_port=_port(environ, DEFAULT_PORT),
    )


def _from_pmi(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "PMI_SIZE") or 1
    local_size = _int(environ, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
    return LaunchEnv(
        launcher="mpiexec (MPICH/PMI)",
        rank=_int(environ, "PMI_RANK") or 0,
        world_size=world,
        local_rank=_int(environ, "MPI_LOCALRANKID", "PMI_LOCAL_RANK") or 0,
        node_rank=None,
        master_addr=_mpi_master(environ, world, local_size, "mpiexec"),
        master_port=_port(environ, DEFAULT_PORT),
    )


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    nodelist = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST")
    )
    if "MASTER_ADDR" in environ:
        master = environ["MASTER_ADDR"]
    elif nodelist:
        master = expand_nodelist(nodelist)[0]
    else:
        raise LaunchError(
            "started by srun but SLURM_STEP_NODELIST is empty: set MASTER_ADDR to rank 0's host"
        )
    return LaunchEnv(
        launcher="srun",
        rank=_int(environ, "SLURM_PROCID") or 0,
        world_size=_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1,
        local_rank=_int(environ, "SLURM_LOCALID") or 0,
        node_rank=_int(environ, "SLURM_NODEID"),
        master_addr=master,
        master_port=_port(environ, _slurm_port(environ)),
    )


def _single(environ: Mapping[str, str]) -> LaunchEnv:
    port = _int(environ, "MASTER_PORT")
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    return LaunchEnv("python", 0, 1, 0, None, environ.get("MASTER_ADDR", "127.0.0.1"), port)


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch environment of this process (see the module docstring for the precedence)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        found = _from_torch_env(env)
    elif "OMPI_COMM_WORLD_RANK" in env:
        found = _from_openmpi(env)
    elif "PMI_RANK" in env and "PMI_SIZE" in env and "SLURM_STEP_NUM_TASKS" not in env:
        found = _from_pmi(env)
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        found = _from_slurm(env)
    else:
        found = _single(env)
    if not 0 <= found.rank < found.world_size:
        raise LaunchError(
            f"{found.launcher} gave rank {found.rank} outside world size {found.world_size}: check the launch command"
        )
    return found
