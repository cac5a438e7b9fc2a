"""Faults caused for real, through the real entry points: a checkpoint file overwritten in place, a
full filesystem (a small tmpfs in a private mount namespace), injected loss spikes
(debug.inject_loss_spike_at), a worker SIGKILLed under torchrun --max-restarts, a rank stopped with
SIGSTOP, and a resume with another model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    ITERS,
    REPO,
    TOKENIZER,
    check,
    free_port,
    launch_cmd,
    read_metrics,
    run,
    script,
    tiny_args,
    train_losses,
)

pytestmark = [pytest.mark.integration]


def _pretrain(prefix: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["python", script("pretrain.py"), *tiny_args(prefix, run_dir, *extra)]


def _overwrite_middle(path: Path) -> None:
    """4 KB of other bytes in the middle of the file; the size stays the same."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        original = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in original))
    assert path.stat().st_size == size


def test_a_corrupt_same_size_file_is_detected_named_and_skipped(builtin_prefix: Path, tmp_path: Path) -> None:
    check(run(_pretrain(builtin_prefix, tmp_path, "checkpoint.save_interval=5")))
    ckpt = tmp_path / "checkpoints"
    damaged = ckpt / "iter_0000010" / "mp_rank_00_model_states.pt"
    _overwrite_middle(damaged)
    damaged_bytes = damaged.read_bytes()

    p = run(["python", script("verify_checkpoint.py"), str(ckpt)])
    assert p.returncode == 1
    assert f"ok       {ckpt / 'iter_0000005'}" in p.stdout
    assert f"checkpoint file '{damaged}' is damaged: xxh3_64 " in p.stdout and "written as" in p.stdout

    p = run(["python", script("evaluate.py"), "--checkpoint", str(ckpt), "--data", str(builtin_prefix)])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[
        -2000:
    ]  # generate/convert: the same loader
    assert f"error: checkpoint file '{damaged}' is damaged: xxh3_64" in p.stderr

    explicit = _pretrain(
        builtin_prefix, tmp_path, "train.train_iters=12", f"checkpoint.resume={damaged.parent}"
    )
    p = run(explicit)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"checkpoint file '{damaged}' is damaged" in p.stderr

    p = run(_pretrain(builtin_prefix, tmp_path, "checkpoint.save_interval=5", "train.train_iters=12"))
    check(p)
    out = p.stdout + p.stderr
    assert f"skipping checkpoint: checkpoint file '{damaged}' is damaged: xxh3_64" in out
    assert f"resumed from {ckpt / 'iter_0000005'} at iteration 5" in out
    assert all(r["loss"] < 20 for r in read_metrics(tmp_path) if "loss" in r)  # no garbage weights loaded
    # the new save at iteration 10 did not overwrite the damaged checkpoint: it was moved aside, bytes intact
    (aside,) = (ckpt / "replaced").glob("iter_0000010.*")
    assert f"checkpoint {ckpt / 'iter_0000010'} already existed: it was moved to {aside}" in out
    assert (aside / damaged.name).read_bytes() == damaged_bytes
    assert (
        run(["python", script("verify_checkpoint.py"), str(ckpt)]).returncode == 0
    )  # the new ones are whole


def _tmpfs_run(mount: Path, size_bytes: int, command: list[str], after: str) -> subprocess.CompletedProcess:
    """`command` with a `size_bytes` tmpfs on `mount`, in a private user and mount namespace (works
    without root); `after` is a shell command run in the namespace afterwards (the mount is gone then)."""
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed for the full-disk test")
    mount.mkdir(parents=True)
    quoted = " ".join(f"'{c}'" for c in command)
    shell = (f"mount -t tmpfs -o size={size_bytes} tmpfs '{mount}' || exit 99; {quoted}; echo \"exit status $?\"; "
             f"{after}")  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_a_full_disk_is_one_line_and_keeps_latest(
    builtin_prefix: Path, tmp_path: Path, reference_run: Path
) -> None:
    """Room for one checkpoint and a half: the save at iteration 3 fits (with a warning that the next
    will not), the one at 6 fills the disk."""
    one = sum(
        f.stat().st_size for f in (reference_run / "checkpoints" / "iter_0000010").rglob("*") if f.is_file()
    )
    ckpt = tmp_path / "ckpt"
    cmd = ["python", script("pretrain.py"), *tiny_args(builtin_prefix, tmp_path, "checkpoint.save_interval=3",
                                                       f"checkpoint.dir={ckpt}")]  # fmt: skip
    after = f"cat '{ckpt}/latest'; echo; ls '{ckpt}'; python '{script('verify_checkpoint.py')}' '{ckpt}'"
    p = _tmpfs_run(ckpt, int(one * 1.6), cmd, after)
    assert "exit status 99" not in p.stdout, "mounting a tmpfs in a user namespace failed: " + p.stderr
    assert "exit status 1" in p.stdout and "Traceback" not in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert (
        f"saving checkpoint '{ckpt / 'iter_0000006'}' failed: no space left on the device of '{ckpt}'"
        in errors[0]
    )
    assert (
        "MB free, a checkpoint needs about" in errors[0] and "'latest' still names iter_0000003" in errors[0]
    )
    assert "the next save will fail unless space is freed" in p.stderr  # warned one save ahead
    listing = p.stdout.split("exit status 1", 1)[1].split()
    assert listing[:3] == ["iter_0000003", "iter_0000003", "latest"]  # latest, then the directory: no partial
    assert (
        f"ok       {ckpt / 'iter_0000003'} (latest)" in p.stdout and "1 of 1 checkpoints intact" in p.stdout
    )


def _rollbacks(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "rollback" in r]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [[], ["deepspeed_config=configs/deepspeed/zero1.json"], ["parallel.pipeline_model_parallel_size=2"]],
    ids=["dp2_zero0", "dp2_zero1", "pp2"],
)
def test_an_injected_nan_rolls_back_on_every_rank_and_skips_the_batches(
    builtin_prefix: Path, tmp_path: Path, layout: list[str]
) -> None:
    """Two ranks; the NaN reaches the weights at iteration 5 (under the pipeline too: it is injected
    in the last stage's loss function); both reload iteration 3 and skip samples [24, 40): the batches
    of iterations 4 and 5 (global batch 8). The run afterwards equals, bit for bit, a run resumed
    from that checkpoint told to skip the same batches (train.skip_batches): weights, optimizer, random
    streams (dropout is on) and data position were all restored."""
    run_dir = tmp_path / "rolled_back"
    common = ["model.dropout=0.1", *layout]
    p = run(launch_cmd(2, *tiny_args(builtin_prefix, run_dir, "checkpoint.save_interval=3",
                                     "debug.inject_loss_spike_at=[5]", *common)))  # fmt: skip
    check(p)
    (event,) = _rollbacks(run_dir)
    assert event["iteration"] == 5 and event["rollback_to_iteration"] == 3 and event["spike_loss"] is None
    assert event["skipped_sample_range"] == [24, 40] and event["skipped_samples"] == 16
    assert event["checkpoint"] == str(run_dir / "checkpoints" / "iter_0000003")
    assert "rollback 1/3: loss is nan at iteration 5; reloaded" in p.stdout + p.stderr
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    after = records[
        records.index(next(r for r in records if r["iteration"] == 4 and r["consumed_samples"] > 32)) :
    ]
    assert [(r["iteration"], r["consumed_samples"]) for r in after] == [
        (i, 8 * i + 16) for i in range(4, ITERS + 1)
    ]
    meta = json.loads((run_dir / "checkpoints" / "iter_0000010" / "llm_meta.json").read_text())
    assert meta["skipped_samples"] == 16 and meta["consumed_samples"] == 96 and meta["rollbacks"] == 1

    resumed = tmp_path / "resumed"
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, resumed, "train.skip_batches=[4-5]", *common,
                                       f"checkpoint.resume={run_dir / 'checkpoints' / 'iter_0000003'}"))))  # fmt: skip
    assert [r["loss"] for r in after] == train_losses(resumed)
    assert all(r["loss"] < 20 for r in after)  # finite and sane
    if layout and "pipeline" in layout[0]:
        _assert_injection_reaches_the_weights(builtin_prefix, tmp_path, layout)


def _assert_injection_reaches_the_weights(prefix: Path, tmp_path: Path, layout: list[str]) -> None:
    """Under the pipeline engine the injected spike changes the weights, not only the reported loss: a
    huge loss at iteration 3, undetected (window 0: non-finite losses only) and unclipped, leaves
    Adam's second moment swamped, so the steps after it differ from a run without it."""
    args = ["train.train_iters=5", "train.spike_detection.window=0", "train.clip_grad=0", *layout]
    check(run(launch_cmd(2, *tiny_args(prefix, tmp_path / "plain", *args))))
    check(run(launch_cmd(2, *tiny_args(prefix, tmp_path / "spiked", *args, "debug.inject_loss_spike_at=[3]",
                                       "debug.inject_loss_value=huge"))))  # fmt: skip
    plain, spiked = train_losses(tmp_path / "plain"), train_losses(tmp_path / "spiked")
    assert plain[:2] == spiked[:2] and spiked[2] > 1e6 * plain[2]
    assert all(abs(a - b) > 1e-3 for a, b in zip(plain[3:], spiked[3:])), (plain, spiked)


def test_a_huge_finite_spike_is_detected_and_the_margin_skipped(builtin_prefix: Path, tmp_path: Path) -> None:
    args = ["checkpoint.save_interval=3", "debug.inject_loss_spike_at=[6]", "debug.inject_loss_value=huge",
            "train.spike_detection.window=3", "train.skip_batches_on_rollback=1"]  # fmt: skip
    check(run(_pretrain(builtin_prefix, tmp_path, *args)))
    (event,) = _rollbacks(tmp_path)
    assert event["iteration"] == 6 and event["rollback_to_iteration"] == 3 and event["spike_loss"] > 1e6
    assert 0 < event["spike_threshold"] < 100
    assert event["skipped_sample_range"] == [24, 56]  # batches of iterations 4-6, and 1 more
    meta = json.loads((tmp_path / "checkpoints" / "iter_0000006" / "llm_meta.json").read_text())
    assert meta["consumed_samples"] == 3 * 8 + 56  # the checkpoint written after the rollback


def test_rollbacks_stop_at_max_rollbacks_with_todays_message(builtin_prefix: Path, tmp_path: Path) -> None:
    p = run(_pretrain(builtin_prefix, tmp_path, "checkpoint.save_interval=3", "debug.inject_loss_spike_at=[5]",
                      "train.max_rollbacks=0"))  # fmt: skip
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert (
        "loss is nan at iteration 5: training diverged (train.max_rollbacks = 0 rollbacks done)" in p.stderr
    )


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.distributed
def test_a_sigkilled_rank_restarts_under_torchrun_and_matches(builtin_prefix: Path, tmp_path: Path) -> None:
    """torchrun --max-restarts 1: one worker is SIGKILLed after the checkpoint of iteration 4; the
    group restarts, resumes from `latest` and ends with the losses of an uninterrupted run, bitwise."""
    extra = ["checkpoint.save_interval=4", "deepspeed_config=configs/deepspeed/zero1.json"]
    reference = tmp_path / "reference"
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, reference, *extra))))
    run_dir = tmp_path / "restarted"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "1", "--master_port", str(free_port()),
           script("pretrain.py"), *tiny_args(builtin_prefix, run_dir, *extra)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    log = tmp_path / "torchrun.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    latest, deadline = run_dir / "checkpoints" / "latest", time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "iter_0000004"):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    last = {r["iteration"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}  # the restart's, last
    assert [last[i] for i in range(1, ITERS + 1)] == train_losses(reference)


@pytest.mark.distributed
@pytest.mark.parametrize("world, layout", [(2, []), (4, ["parallel.pipeline_model_parallel_size=2"])],
                         ids=["dp2", "pp2_dp2"])  # fmt: skip
def test_a_stopped_rank_makes_the_others_exit_within_the_timeout(
    builtin_prefix: Path, tmp_path: Path, world: int, layout: list[str]
) -> None:
    """Also under pipeline parallelism at PP 2 x DP 2, where rank 0 waits for the stopped rank 1 in the
    data-parallel group that DeepSpeed's pipeline grid made (it kept torch's 30 minutes)."""
    args = tiny_args(
        builtin_prefix, tmp_path, "train.train_iters=100000", "parallel.timeout_minutes=0.25", *layout
    )
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}",
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        out = subprocess.PIPE if rank < 2 else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, script("pretrain.py"), *args], cwd=REPO, env=env,
                                      stdout=out, stderr=out, text=True))  # fmt: skip
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 180
    try:
        while time.time() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3
        ):
            time.sleep(0.1)
        assert metrics.exists(), procs[0].communicate(timeout=5)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - stopped
    finally:
        for proc in procs[1:]:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert waited < 60, waited  # the timeout is 15 s; no rank waits for ever
    assert "error: rank 0: a collective gave up after parallel.timeout_minutes = 0.25" in err, err[-3000:]
    assert "another rank is hung, stopped or dead" in err and "Traceback" not in err


def test_resume_refuses_another_model_naming_each_setting(
    builtin_prefix: Path, tmp_path: Path, reference_run: Path
) -> None:
    saved = tmp_path / "saved"
    shutil.copytree(reference_run / "checkpoints", saved)
    resume = [f"checkpoint.resume={saved}", f"train.train_iters={ITERS + 2}"]
    p = run(
        _pretrain(builtin_prefix, tmp_path, *resume, "model.num_attention_heads=4", "model.rope_theta=500")
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "model.num_attention_heads: checkpoint 2, config 4" in p.stderr
    assert (
        "model.rope_theta: checkpoint 10000.0, config 500.0" in p.stderr
        and "checkpoint.resume=none" in p.stderr
    )

    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(TOKENIZER.read_bytes())
    proto.pieces[300].score -= 1.0  # same vocabulary size, another tokenizer
    other = tmp_path / "other.model"
    other.write_bytes(proto.SerializeToString())
    p = run(_pretrain(builtin_prefix, tmp_path, *resume, f"data.tokenizer={other}"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"config '{other}'" in p.stderr and "a different tokenizer" in p.stderr
    # settings that may change (activation checkpointing, dropout, ...): tests/unit/test_faults.py


def test_the_spike_window_survives_a_restart(builtin_prefix: Path, tmp_path: Path) -> None:
    """The detector's window is in the checkpoint: a resumed run sees a spike in its first step (it
    needed `window` new losses first, so a huge loss right after a restart trained into the weights)."""
    window = ["train.spike_detection.window=3", "checkpoint.save_interval=3"]
    check(run(_pretrain(builtin_prefix, tmp_path, *window, "train.train_iters=6")))
    meta = json.loads((tmp_path / "checkpoints" / "iter_0000006" / "llm_meta.json").read_text())
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert meta["spike_history"] == losses[-3:]
    check(run(_pretrain(builtin_prefix, tmp_path, *window, "train.train_iters=8", "debug.inject_loss_spike_at=[7]",
                        "debug.inject_loss_value=huge")))  # fmt: skip
    (event,) = _rollbacks(tmp_path)
    assert event["iteration"] == 7 and event["rollback_to_iteration"] == 6 and event["spike_loss"] > 1e6
    assert all(r["loss"] < 20 for r in read_metrics(tmp_path) if "loss" in r and r["iteration"] > 6)


@pytest.mark.parametrize("extra", [[], ["checkpoint.async_save=true"]], ids=["sync", "async"])
def test_a_save_failing_on_one_node_stops_every_rank_at_once(extra: list[str], builtin_prefix: Path, tmp_path: Path) -> None:
    """Two "nodes" of one rank each; node 1's checkpoint directory is a node-local disk (a 512 KB
    tmpfs in its own mount namespace) too small for its ZeRO shard. Every rank stops with one line
    naming rank 1, the path and the cause, long before parallel.timeout_minutes (10): rank 0 used to
    wait in DeepSpeed's closing barrier of the save until the collective timeout. Asynchronous: the
    write fails in rank 1's writer thread, every rank's writer agrees on it, and both ranks stop at
    the next step boundary with the same line."""
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed for this test")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    args = [script("pretrain.py"), *tiny_args(builtin_prefix, tmp_path / "run", "train.train_iters=4",
            "checkpoint.save_interval=2", f"checkpoint.dir={ckpt}", "deepspeed_config=configs/deepspeed/zero1.json",
            "parallel.timeout_minutes=10", *extra)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_RANK="0")  # fmt: skip
    python = str(BIN / "python")
    node1 = f"mount -t tmpfs -o size=524288 tmpfs '{ckpt}' || exit 99; exec {python} " + " ".join(
        f"'{a}'" for a in args
    )
    procs = [
        subprocess.Popen([python, *args], cwd=REPO, env=dict(env, RANK="0", NODE_RANK="0"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True),
        subprocess.Popen(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", node1], cwd=REPO,
                         env=dict(env, RANK="1", NODE_RANK="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True),
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert procs[1].returncode != 99, "mounting a tmpfs in a user namespace failed: " + outs[1][1]
    assert [p.returncode for p in procs] == [1, 1], outs[0][1][-3000:] + outs[1][1][-3000:]
    errors = [line for _, err in outs for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in outs[0][1] + outs[1][1], errors
    assert errors[0].startswith(f"error: rank 1: saving checkpoint '{ckpt / 'iter_0000002'}' failed: no space left "
                                f"on the device of '{ckpt}'")  # fmt: skip
    assert (
        not (ckpt / "iter_0000002").exists() and not (ckpt / "latest").exists()
    )  # rank 0's side: no partial
