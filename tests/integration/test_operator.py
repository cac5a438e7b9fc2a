"""What people do, through the real entry point: a second run on a busy directory, Ctrl-C, and a
resume with a changed learning rate."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.config import load_config
from llm.training.lr_schedule import lr_at
from tests.conftest import BIN, REPO, check, deepspeed_cmd, read_metrics, run, script, tiny_args

pytestmark = [pytest.mark.integration]


def test_a_second_run_on_a_busy_directory_refuses_and_ctrl_c_saves(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    args = tiny_args(builtin_prefix, tmp_path, "train.train_iters=100000")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    first = subprocess.Popen([sys.executable, script("pretrain.py"), *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 180
    try:
        while time.time() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3
        ):
            time.sleep(0.1)
        config_before = (tmp_path / "config.yaml").read_text()
        second = run(["python", script("pretrain.py"), *args, "train.lr=1e-3"])
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"'{tmp_path}' is in use by another run (pid {first.pid} on " in second.stderr
        assert (tmp_path / "config.yaml").read_text() == config_before  # the first run's files untouched
        first.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    last = [r["iteration"] for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert f"stopped at iteration {last} (SIGINT); checkpoint saved" in out and "Traceback" not in err
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"iter_{last:07d}"
    assert not (tmp_path / ".llm.lock").exists()


def test_a_resume_with_a_new_learning_rate_uses_it(builtin_prefix: Path, tmp_path: Path) -> None:
    check(run(["python", script("pretrain.py"), *tiny_args(builtin_prefix, tmp_path, "train.train_iters=6")]))
    p = run(["python", script("pretrain.py"), *tiny_args(builtin_prefix, tmp_path, "train.train_iters=10",
                                                         "train.lr=1e-3", "train.min_lr=1e-4")])  # fmt: skip
    check(p)
    out = p.stdout + p.stderr
    assert "resume: train.lr: 0.002 -> 0.001" in out and "resume: train.train_iters: 6 -> 10" in out
    new = load_config(tmp_path / "config.yaml").train
    used = {r["iteration"]: r["lr"] for r in read_metrics(tmp_path) if "lr" in r}
    assert [used[i] for i in range(7, 11)] == pytest.approx(
        [lr_at(i - 1, new) for i in range(7, 11)], rel=1e-12
    )
    old = dataclasses.replace(
        new, lr=2e-3, train_iters=6, min_lr=load_config(REPO / "configs" / "tiny_cpu.yaml").train.min_lr
    )
    assert used[7] != pytest.approx(lr_at(6, old))  # what keeping the saved schedule would have given
    history = [json.loads(x) for x in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["iteration"] == 6 and "train.lr: 0.002 -> 0.001" in history[-1]["changes"]
    # rerunning a finished run with fewer iterations says why nothing happens (it was silent)
    p = run(["python", script("pretrain.py"), *tiny_args(builtin_prefix, tmp_path, "train.train_iters=8",
                                                         "train.lr=1e-3", "train.min_lr=1e-4")])  # fmt: skip
    check(p)
    assert "nothing to train: the checkpoint is at iteration 10, train.train_iters = 8" in p.stdout + p.stderr
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_0000010"


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()
    }


def test_a_run_never_writes_into_another_runs_directory(builtin_prefix: Path, tmp_path: Path) -> None:
    """The README's import-and-continue case: a run resumed from elsewhere must not train into a run
    directory that holds another run (it wrote iter_* there, moved `latest`, appended its metrics);
    nor may a fresh start or a resume to an older checkpoint replace newer checkpoints."""
    ours, other = tmp_path / "ours", tmp_path / "other"
    check(run(["python", script("pretrain.py"), *tiny_args(builtin_prefix, ours, "train.train_iters=4",
                                                           "checkpoint.save_interval=2")]))  # fmt: skip
    shutil.copytree(ours / "checkpoints", other / "checkpoints")  # another run's checkpoints (or an import)
    before = _snapshot(ours)
    cases = {
        f"checkpoint.resume={other / 'checkpoints'}": f"checkpoint.dir '{ours / 'checkpoints'}' holds another run's "
        f"checkpoints (iter_0000004, iter_0000002); resuming from '{other / 'checkpoints'}' would write this run's "
        "checkpoints among them: set logging.dir (or checkpoint.dir) to a new directory",
        "checkpoint.resume=none": "checkpoint.resume=none starts a new run, but checkpoint.dir "
        f"'{ours / 'checkpoints'}' holds checkpoints (iter_0000004, iter_0000002) that its saves would replace",
        f"checkpoint.resume={ours / 'checkpoints' / 'iter_0000002'}": "goes back past newer checkpoints of this "
        f"run (iter_0000004) that its saves would replace: move them out of '{ours / 'checkpoints'}' first",
    }
    for override, message in cases.items():
        p = run(
            [
                "python",
                script("pretrain.py"),
                *tiny_args(builtin_prefix, ours, "train.train_iters=8", override),
            ]
        )
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert p.stderr.count("error: ") == 1 and message in p.stderr, p.stderr[-3000:]
        assert _snapshot(ours) == before  # not a byte written: checkpoints, latest, metrics, config
    # metrics of a run that never saved belong to it too
    (ours / "checkpoints").rename(tmp_path / "moved")
    p = run(
        [
            "python",
            script("pretrain.py"),
            *tiny_args(builtin_prefix, ours, f"checkpoint.resume={other / 'checkpoints'}"),
        ]
    )
    assert p.returncode == 1 and f"logging.dir '{ours}' holds another run's metrics" in p.stderr, p.stderr[
        -3000:
    ]


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _alive(pids: list[int]) -> list[int]:
    import psutil

    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_sigterm_and_ctrl_c_through_the_deepspeed_launcher_save_and_leave_no_process(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """SIGTERM to the `deepspeed` runner alone (what `kill PID` or a container runtime sends; the
    runner dies without forwarding it), and Ctrl-C (SIGINT to the whole foreground process group).
    Both launches run at once to share the start-up time."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    runs = {"SIGTERM": (tmp_path / "term", 2), "SIGINT": (tmp_path / "int", 1)}
    procs = {
        name: subprocess.Popen(
            deepspeed_cmd(n, *tiny_args(builtin_prefix, d, "train.train_iters=100000")),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for name, (d, n) in runs.items()
    }
    try:
        deadline = time.time() + 240
        for d, _ in runs.values():
            while time.time() < deadline and not (
                (d / "metrics.jsonl").exists() and len((d / "metrics.jsonl").read_text().splitlines()) >= 3
            ):
                time.sleep(0.2)
        workers = {name: _descendants(p.pid) for name, p in procs.items()}
        assert len(workers["SIGTERM"]) >= 3, workers  # deepspeed.launcher.launch and two ranks
        os.kill(procs["SIGTERM"].pid, signal.SIGTERM)  # the runner only
        os.killpg(procs["SIGINT"].pid, signal.SIGINT)  # the terminal's Ctrl-C
        outputs = {name: p.communicate(timeout=180)[0] for name, p in procs.items()}  # EOF: every writer gone
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    for name, (run_dir, nproc) in runs.items():
        out = outputs[name]
        deadline = time.time() + 30
        while _alive(workers[name]) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(workers[name]), (name, out[-3000:])  # no orphan
        last = [r["iteration"] for r in read_metrics(run_dir) if "loss" in r][-1]
        assert (run_dir / "checkpoints" / "latest").read_text() == f"iter_{last:07d}", (name, out[-3000:])
        why = "launcher exited" if name == "SIGTERM" else "SIGINT"
        # Every worker stopped at the same iteration and returned (a rank that learned of the stop from
        # another says so); the reason is the first the run saw.
        assert out.count(f"stopped at iteration {last} (") == nproc, (name, out[-3000:])
        assert f"stopped at iteration {last} ({why}); checkpoint saved" in out, (name, out[-3000:])
        # No worker prints a traceback; on Ctrl-C DeepSpeed's runner prints its own KeyboardInterrupt.
        assert all("deepspeed/launcher/runner.py" in tb for tb in out.split("Traceback")[1:]), out[-3000:]
        assert name == "SIGINT" or "Traceback" not in out
        assert not (run_dir / ".llm.lock").exists()
    # Every worker exited 0: the per-node launcher reports it for the SIGTERM run.
    assert (
        outputs["SIGTERM"].count("exits successfully") == 2
        and "exits with return code" not in outputs["SIGTERM"]
    )


def test_a_config_mistake_on_two_processes_is_printed_once(builtin_prefix: Path, tmp_path: Path) -> None:
    from tests.conftest import launch_cmd

    p = run(launch_cmd(2, *tiny_args(builtin_prefix, tmp_path, "train.global_batch_size=6")))
    assert p.returncode != 0
    assert p.stderr.count("error: train.global_batch_size (6) must be a multiple of") == 1, p.stderr[-3000:]
    assert not (tmp_path / "config.yaml").exists()


def _in_read_only_mount(directory: Path, command: list[str]) -> subprocess.CompletedProcess:
    """`command` with `directory` bind-mounted read-only onto itself, in a private user and mount
    namespace (a real read-only filesystem; works without root, and root's permission bypass does
    not apply to it)."""
    quoted = " ".join(f"'{c}'" for c in command)
    shell = f"mount --bind '{directory}' '{directory}' && mount -o remount,ro,bind '{directory}' || exit 99; {quoted}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_directories_that_cannot_be_written_are_one_line_at_start(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """A file where a directory should be, a read-only mount: named with the setting and the cause
    before any work (it was an OSError traceback from the run lock, or a failed save hours later)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    pretrain = ["python", script("pretrain.py")]
    cases = [
        (tiny_args(builtin_prefix, blocker), f"error: logging.dir '{blocker}' cannot be written: it is a file, not a directory"),
        (tiny_args(builtin_prefix, tmp_path / "run1", f"logging.tensorboard_dir={blocker}/tb"),
         f"error: logging.tensorboard_dir '{blocker}/tb' cannot be written: a part of the path is a file"),
    ]  # fmt: skip
    for args, message in cases:
        p = run([*pretrain, *args])
        assert p.returncode == 1 and p.stderr.startswith(message) and p.stderr.count("\n") == 1, p.stderr[
            -3000:
        ]
    read_only = tmp_path / "ro"
    (read_only / "checkpoints").mkdir(parents=True)
    p = _in_read_only_mount(read_only, [str(BIN / "python"), script("pretrain.py"), *tiny_args(
        builtin_prefix, tmp_path / "run2", f"checkpoint.dir={read_only / 'checkpoints'}")])  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert (
        p.stderr.startswith(
            f"error: checkpoint.dir '{read_only / 'checkpoints'}' cannot be written: the "
            "filesystem is read-only; choose a writable directory"
        )
        and "Traceback" not in p.stderr
    )
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()  # before any work


def test_a_resume_on_other_data_is_refused_unless_allowed(builtin_prefix: Path, tmp_path: Path) -> None:
    """The corpus replaced under the same prefix (or a dataset added to the blend): the data order
    after the resume would mean nothing, so it is refused naming what changed; allowed, it is
    announced and recorded like any resume change."""
    from llm.data.builtin_corpus import iter_documents
    from llm.data.preprocess import preprocess
    from llm.data.sources import Record
    from tests.conftest import TOKENIZER

    data = tmp_path / "data"
    data.mkdir()
    prefix = data / "corpus"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{builtin_prefix}{suffix}", f"{prefix}{suffix}")
    run_dir = tmp_path / "run"
    check(run(["python", script("pretrain.py"), *tiny_args(prefix, run_dir, "train.train_iters=4")]))
    meta = json.loads((run_dir / "checkpoints" / "iter_0000004" / "llm_meta.json").read_text())
    assert meta["data_identity"]["train"][0]["tokens"] > 0 and meta["data_identity"]["seed"] == 1234

    records = (Record("str", t, "other", i) for i, t in enumerate(list(iter_documents())[::2], 1))
    preprocess(
        records, tokenizer=str(TOKENIZER), output_prefix=prefix, workers=1, progress=False
    )  # same name
    before = _snapshot(run_dir)
    p = run(["python", script("pretrain.py"), *tiny_args(prefix, run_dir, "train.train_iters=6")])
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert (
        f"error: the data differs from what checkpoint '{run_dir / 'checkpoints' / 'iter_0000004'}' was "
        f"trained on: train dataset 1 ('{prefix}'): tokens "
    ) in p.stderr and p.stderr.count("error: ") == 1
    assert "documents " in p.stderr and "data.allow_changed_data=true" in p.stderr
    blend = f"data.train_data_path=[0.5, {builtin_prefix}, 0.5, {prefix}]"
    p = run(["python", script("pretrain.py"), *tiny_args(prefix, run_dir, "train.train_iters=6", blend)])
    assert p.returncode == 1 and f"train dataset 2 ('{prefix}') added" in p.stderr, p.stderr[-3000:]
    assert _snapshot(run_dir) == before  # refused before anything was written

    p = run(["python", script("pretrain.py"), *tiny_args(prefix, run_dir, "train.train_iters=6",
                                                         "data.allow_changed_data=true")])  # fmt: skip
    check(p)
    assert f"resume: data: train dataset 1 ('{prefix}'): tokens " in p.stdout + p.stderr
    history = [json.loads(x) for x in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert any(c.startswith("data: train dataset 1") for c in history[-1]["changes"])
    saved = json.loads((run_dir / "checkpoints" / "iter_0000006" / "llm_meta.json").read_text())[
        "data_identity"
    ]
    assert (
        saved["train"][0]["tokens"] != meta["data_identity"]["train"][0]["tokens"]
    )  # the new data, from now on
