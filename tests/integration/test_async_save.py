"""Asynchronous checkpoint saves (checkpoint.async_save) through the real entry point: the same bytes
as a synchronous save, exact resumes from them, and a process killed while its background write is
in flight. (A full disk during a background write: test_faults.py, its "async" case.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    assert_same_curve,
    check,
    launch_cmd,
    read_metrics,
    run,
    script,
    tiny_args,
    train_losses,
)

pytestmark = pytest.mark.integration


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _blocks(records: list[dict]) -> dict[int, float]:
    """{iteration of a save: checkpoint_block_seconds} of an asynchronous run's metrics."""
    return {r["iteration"]: r["checkpoint_block_seconds"] for r in records if "checkpoint_block_seconds" in r}


def _zip_crcs(directory: Path) -> set[int]:
    """The CRC-32 recorded for each zip record of every torch file under `directory`."""
    crcs: set[int] = set()
    for f in directory.rglob("*.pt"):
        with zipfile.ZipFile(f) as archive:
            crcs.update(info.CRC for info in archive.infolist())
    return crcs


@pytest.mark.parametrize(
    ("nproc", "extra"),
    [(2, ["deepspeed_config=configs/deepspeed/zero1.json"]),
     (2, ["deepspeed_config=configs/deepspeed/zero1.json", "train.precision=bf16"])],
    ids=["dp2_zero1_fp32", "dp2_zero1_bf16"],
)  # fmt: skip
def test_async_saves_write_the_bytes_of_sync_saves_and_resume_exactly(
    nproc: int, extra: list[str], builtin_prefix: Path, tmp_path: Path
) -> None:
    """The same run saved synchronously and asynchronously (same run directory, one after the other):
    every file of every checkpoint, MANIFEST included, byte for byte, though each host copy was made
    after the next step's forward and backward (debug.checkpoint_copy_delay_seconds). The
    asynchronous run's metrics hold the blocking part of each save (which includes the optimizer
    step's wait for the copy) and the background part. Resumed from its checkpoint at iteration
    4: bitwise the same steps at the same layout, the same curve at another (one process, ZeRO 0).
    No torch file of the checkpoints records a zip CRC-32 (writer.without_zip_crc32)."""
    run_dir = tmp_path / "run"
    args = ["train.train_iters=6", "checkpoint.save_interval=2", *extra]  # no dropout: its streams restart at another layout
    check(run(launch_cmd(nproc, *tiny_args(builtin_prefix, run_dir, *args))))
    sync = _files(run_dir / "checkpoints")
    shutil.rmtree(run_dir)
    # each host copy starts 3 s late: the next step's forward and backward run first (on a loaded
    # machine's 2 cores they once took 0.8 s, and a copy 1 s late left a wait of 0.18 s)
    check(run(launch_cmd(nproc, *tiny_args(builtin_prefix, run_dir, *args, "checkpoint.async_save=true",
                                           "debug.checkpoint_copy_delay_seconds=3"))))  # fmt: skip
    asynchronous = _files(run_dir / "checkpoints")
    assert sorted(asynchronous) == sorted(sync) and any(n.endswith("MANIFEST.json") for n in sync)
    assert [n for n in sync if sync[n] != asynchronous[n]] == []
    records = read_metrics(run_dir)
    blocks = _blocks(records)
    assert sorted(blocks) == [2, 4, 6]
    assert blocks[2] > 1 and blocks[4] > 1  # the next optimizer step waited for the copy (3 s late)
    assert [r["iteration"] for r in records if "checkpoint_write_seconds" in r] == [2, 4, 6]
    assert not [r for r in records if "checkpoint_save_seconds" in r]

    ckpt, straight = run_dir / "checkpoints" / "iter_0000004", train_losses(run_dir)
    same, other = tmp_path / "same", tmp_path / "other"
    check(run(launch_cmd(nproc, *tiny_args(builtin_prefix, same, *args, f"checkpoint.resume={ckpt}"))))
    assert train_losses(same) == straight[4:]
    precision = [e for e in extra if e.startswith("train.precision")]
    check(run(launch_cmd(1, *tiny_args(builtin_prefix, other, "train.train_iters=6", *precision,
                                       f"checkpoint.resume={ckpt}"))))  # fmt: skip
    assert_same_curve(train_losses(other), straight[4:], 1e-3 if precision else 1e-4)
    # torch.save computed no zip CRC-32 (torch.load never reads it; MANIFEST's checksums are what is
    # checked): not in the saves, nor in the universal form the resume at another layout wrote
    assert (ckpt / "universal").is_dir() and _zip_crcs(run_dir / "checkpoints") == {0}


@pytest.mark.parametrize(
    "layout",
    [["deepspeed_config=configs/deepspeed/zero3.json"], ["parallel.pipeline_model_parallel_size=2"]],
    ids=["dp2_zero3", "pp2"],
)
def test_async_saves_of_zero3_and_pipeline_runs_write_the_bytes_of_sync_saves(
    layout: list[str], builtin_prefix: Path, tmp_path: Path
) -> None:
    """What the ZeRO 1 test does not cover. ZeRO 3's files hold an empty placeholder per partitioned
    parameter and flat fp32 groups carrying a Python attribute (DeepSpeed's `ds_id`). Under pipeline
    parallelism DeepSpeed runs a whole step in one call, and the optimizer step waits for the copy
    inside its schedule. The same run saved synchronously and asynchronously (the copy of the save
    at 2 made after step 3's forward and backward): every file byte for byte, and step 3 waited."""
    run_dir = tmp_path / "run"
    args = ["train.train_iters=3", "checkpoint.save_interval=2", *layout]
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, run_dir, *args))))
    sync = _files(run_dir / "checkpoints")
    shutil.rmtree(run_dir)
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, run_dir, *args, "checkpoint.async_save=true",
                                       "debug.checkpoint_copy_delay_seconds=3"))))  # fmt: skip
    asynchronous = _files(run_dir / "checkpoints")
    assert sorted(asynchronous) == sorted(sync) and any("rank_01" in n or "zero_pp_rank_1" in n for n in sync)
    assert [n for n in sync if sync[n] != asynchronous[n]] == []
    blocks = _blocks(read_metrics(run_dir))
    assert sorted(blocks) == [2, 3] and blocks[2] > 1  # the copy 3 s late


def test_a_process_killed_during_a_background_write_resumes_from_the_previous_checkpoint(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """Each background write waits 3 s first (debug.checkpoint_write_delay_seconds, a slow disk). The
    process is SIGKILLed right after the save at iteration 4 handed its copy to the writer: `latest`
    still names iteration 2, whose write the save at 4 waited for; iteration 4's directory has no
    MANIFEST. Resumed (auto), the run ends with bitwise the losses of an uninterrupted run."""
    args = ["train.train_iters=6", "checkpoint.save_interval=2", "model.dropout=0.1", "checkpoint.async_save=true"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    check(run(launch_cmd(1, *tiny_args(builtin_prefix, straight, *args))))
    cmd = [str(BIN / "python"), script("pretrain.py"),
           *tiny_args(builtin_prefix, killed, *args, "debug.checkpoint_write_delay_seconds=3")]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=Path(script("pretrain.py")).parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen, deadline = [], time.time() + 180
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "iter_0000004: copying and writing" in line or time.time() > deadline:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    ckpt = killed / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert not (ckpt / "iter_0000004" / "MANIFEST.json").exists()
    p = run(launch_cmd(1, *tiny_args(builtin_prefix, killed, *args)))
    check(p)
    assert f"resumed from {ckpt / 'iter_0000002'} at iteration 2" in p.stdout + p.stderr
    resumed = [r["loss"] for r in read_metrics(killed) if "loss" in r][-4:]
    assert resumed == train_losses(straight)[2:]


def test_keep_last_with_async_saves_never_leaves_the_run_without_a_complete_checkpoint(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """checkpoint.keep_last=1 with a save every step, each background write slowed by 2 s: watched
    from outside while the run goes, `latest` always names a complete checkpoint (a MANIFEST), and the
    previous checkpoint stays until the next one is complete (pruning runs after `latest` moved). At
    the end only the last checkpoint is left. Each save waited for the previous write, and its
    blocking time says so (over 0.5 s: the write 2 s late, less the step between)."""
    run_dir = tmp_path / "run"
    args = ["train.train_iters=5", "checkpoint.save_interval=1", "checkpoint.keep_last=1", "checkpoint.async_save=true",
            "debug.checkpoint_write_delay_seconds=2"]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(BIN / "python"), script("pretrain.py"), *tiny_args(builtin_prefix, run_dir, *args)],
                            cwd=Path(script("pretrain.py")).parents[1], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    ckpt, observed, writing_seen, deadline = run_dir / "checkpoints", set(), False, time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            before = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
            complete = before is not None and (ckpt / before / "MANIFEST.json").is_file()
            after = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
            if before is not None and before == after:  # `latest` did not move while we looked
                assert complete, f"'latest' names {before}, which has no MANIFEST"
                observed.add(before)
                tags = [p.name for p in ckpt.glob("iter_*") if p.is_dir()]
                writing_seen |= any(t > before and not (ckpt / t / "MANIFEST.json").exists() for t in tags)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert writing_seen and len(observed) >= 3, (observed, writing_seen)  # the watch saw saves in flight
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000005"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000005"
    blocks = _blocks(read_metrics(run_dir))
    assert sorted(blocks) == [1, 2, 3, 4, 5]
    assert min(blocks[i] for i in (2, 3, 4, 5)) > 0.5, blocks  # the previous write (2 s late) was not done
