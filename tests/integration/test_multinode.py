"""Two "nodes" on one machine over loopback, started the ways a cluster starts them: the launch
scripts in scripts/launch/ (torchrun with node ranks, DeepSpeed's launcher without ssh), srun's
one-task-per-GPU environment and a real mpirun. Each trains at DP = 2 and must match one process
at the same global batch, at one ZeRO stage each (mpirun 0, torchrun 1, deepspeed 2, srun 3). The
preemption signal SLURM sends reaches the workers through the torchrun script."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    REPO,
    assert_same_curve,
    assert_zero_stage,
    free_port,
    read_metrics,
    tiny_args,
    train_losses,
)

pytestmark = [pytest.mark.integration, pytest.mark.distributed]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{env.get('PATH', '')}", **extra)


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(procs: list[subprocess.Popen], timeout: int = 300) -> list[str]:
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _start_nodes(cmd: list[str], **node_env: str) -> list[subprocess.Popen]:
    """`cmd` started twice with a shared MASTER_PORT; "{n}" in a `node_env` value becomes the node (0, 1)."""
    port = str(free_port())
    return [
        _start(cmd, _env(MASTER_PORT=port, **{k: v.replace("{n}", str(n)) for k, v in node_env.items()}))
        for n in (0, 1)
    ]


def _torchrun_nodes(args: list[str]) -> list[subprocess.Popen]:
    """scripts/launch/torchrun_multinode.sh started twice, as node 0 and node 1 of two, one worker each."""
    config_and_overrides = args[1:]  # tiny_args starts with "--config"; the script takes CONFIG first
    return _start_nodes(["bash", "scripts/launch/torchrun_multinode.sh", *config_and_overrides],
                        NNODES="2", NODE_RANK="{n}", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1")  # fmt: skip


def _check_two_nodes(run_dir: Path, launcher: str, stage: int, reference: list[float]) -> None:
    assert_same_curve(train_losses(run_dir), reference, 1e-5)
    _two_node_layout(run_dir, launcher)
    assert_zero_stage(run_dir, stage)


def _two_node_layout(run_dir: Path, launcher: str) -> None:
    layout = json.loads((run_dir / "layout.json").read_text())
    assert layout["launcher"] == launcher and layout["world_size"] == 2 and layout["dp"] == 2
    assert [n["ranks"] for n in layout["nodes"]] == [[0], [1]]


def test_torchrun_two_nodes_match_one_process(
    builtin_prefix: Path, tmp_path: Path, single_process_losses: list[float]
) -> None:
    procs = _torchrun_nodes(
        tiny_args(builtin_prefix, tmp_path, "deepspeed_config=configs/deepspeed/zero1.json")
    )
    out0, _ = _finish(procs)
    _check_two_nodes(tmp_path, "torchrun", 1, single_process_losses)
    assert "layout: torchrun, 2 node(s) x 1 rank(s) = world 2 = TP 1 x PP 1 x DP 2" in out0


def test_deepspeed_launcher_two_nodes_without_ssh(
    builtin_prefix: Path, tmp_path: Path, single_process_losses: list[float]
) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir = tmp_path / "run"
    args = tiny_args(builtin_prefix, run_dir, "deepspeed_config=configs/deepspeed/zero2.json")
    _finish(_start_nodes(["bash", "scripts/launch/deepspeed_multinode.sh", str(hostfile), *args[1:]],
                         NODE_RANK="{n}", MASTER_ADDR="127.0.0.1"))  # fmt: skip
    _check_two_nodes(run_dir, "deepspeed", 2, single_process_losses)


def test_srun_one_task_per_rank_environment(
    builtin_prefix: Path, tmp_path: Path, single_process_losses: list[float]
) -> None:
    """What srun gives each task (no RANK/WORLD_SIZE): pretrain.py finds rank, world and the
    rendezvous host (first host of the step's node list) from the SLURM variables alone."""
    cmd = [
        str(BIN / "python"),
        "scripts/pretrain.py",
        *tiny_args(builtin_prefix, tmp_path, "deepspeed_config=configs/deepspeed/zero3.json"),
    ]
    _finish(_start_nodes(cmd, SLURM_JOB_ID="4242", SLURM_PROCID="{n}", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                         SLURM_LOCALID="0", SLURM_NODEID="{n}", SLURM_STEP_NODELIST="localhost,127.0.0.[1-1]"))  # fmt: skip
    _check_two_nodes(tmp_path, "srun", 3, single_process_losses)


@pytest.mark.skipif(
    not (BIN / "mpirun").exists(), reason="MPICH's mpirun (the mpich wheel, x86-64 only) is absent"
)
def test_mpirun_ranks_from_pmi(
    builtin_prefix: Path, tmp_path: Path, single_process_losses: list[float]
) -> None:
    """A real mpirun (MPICH's hydra, from the [dev] extras) starts two plain python processes:
    pretrain.py takes rank and world from PMI_RANK / PMI_SIZE and rendezvous on the loopback."""
    p = _start([str(BIN / "mpirun"), "-n", "2", str(BIN / "python"), "scripts/pretrain.py",
                *tiny_args(builtin_prefix, tmp_path, "deepspeed_config=configs/deepspeed/zero0.json")],
               _env(MASTER_PORT=str(free_port())))  # fmt: skip
    _finish([p])
    assert_same_curve(train_losses(tmp_path), single_process_losses, 1e-5)
    layout = json.loads((tmp_path / "layout.json").read_text())
    assert layout["launcher"] == "mpiexec (MPICH/PMI)" and layout["world_size"] == 2
    assert_zero_stage(tmp_path, 0)


def test_preemption_signal_reaches_workers_through_torchrun(builtin_prefix: Path, tmp_path: Path) -> None:
    """SIGUSR1 (SLURM's --signal) sent to one node's torchrun only: both nodes' workers save one
    checkpoint at the same iteration and every process exits 0."""
    procs = _torchrun_nodes(tiny_args(builtin_prefix, tmp_path, "train.train_iters=100000"))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)  # the launch script, which forwards it to its workers
    outs = _finish(procs, timeout=180)
    last = [r["iteration"] for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert re.search(rf"stopped at iteration {last} \(SIGUSR1", outs[0] + outs[1]), outs[0][-2000:]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{last:07d}"


def test_launch_scripts_parse_and_match_the_readme() -> None:
    launch = REPO / "scripts" / "launch"
    scripts = sorted([*launch.glob("*.sh"), *launch.glob("*.sbatch")])
    assert {p.name for p in scripts} >= {
        "env.sh",
        "deepspeed_multinode.sh",
        "torchrun_multinode.sh",
        "slurm.sbatch",
    }
    for path in scripts:
        p = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert p.returncode == 0, f"{path.name}: {p.stderr}"
    readme = (REPO / "README.md").read_text()
    for name in ("deepspeed_multinode.sh", "torchrun_multinode.sh", "slurm.sbatch"):
        # the usage line each script documents is the command the README shows
        usage = next(
            line.lstrip("# ").split("  #")[0].strip()
            for line in (launch / name).read_text().splitlines()
            if f"scripts/launch/{name}" in line and line.startswith("#")
        )
        assert usage in readme, f"README does not show {name}'s usage: {usage}"
    p = subprocess.run(["bash", str(launch / "torchrun_multinode.sh")], capture_output=True, text=True)
    assert p.returncode == 2 and "usage:" in p.stderr


@pytest.mark.parametrize("script", ["torchrun_multinode.sh", "deepspeed_multinode.sh"])
def test_a_launch_script_names_a_missing_config_before_starting_anything(script: str, tmp_path: Path) -> None:
    """One line and exit 2 (it used to start a worker per GPU, each failing, then torchrun's own
    traceback); a config path is taken from where the script was started, or from the repository root."""
    hostfile = ["scripts/launch/hostfile.example"] if script.startswith("deepspeed") else []
    missing = tmp_path / "missing.yaml"
    p = subprocess.run(["bash", str(REPO / "scripts" / "launch" / script), *hostfile, str(missing)], cwd=REPO,
                       env=_env(NPROC_PER_NODE="1"), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (p.returncode, p.stdout, p.stderr) == (
        2, "", f"error: config file '{missing}' not found; pass a YAML file such as configs/gpt2_125m.yaml\n"
    )  # fmt: skip
