"""Shared fixtures: the shipped tokenizer, a token file of the built-in corpus, subprocess helpers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tokenizer" / "llm_sp8k.model"
BIN = Path(sys.executable).parent

# A model small enough that a DeepSpeed run of a few steps takes seconds on 2 cores.
TINY_OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.lr_warmup_iters=2",
    "train.lr=2e-3",
    "logging.log_interval=1",
    "eval.eval_interval=5",
    "eval.eval_iters=2",
    "logging.wandb_mode=disabled",
    "checkpoint.save_interval=null",
]


_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORTS = iter(20000 + 4000 * _WORKER + (os.getpid() + i) % 4000 for i in range(4000 if _WORKER < 3 else 0))


def free_port() -> int:
    """A port nobody listens on, for a launcher's rendezvous. Each pytest worker takes its own ports
    below Linux's ephemeral range (32768-60999), in turn from a point its process id sets (two test
    sessions at once start far apart): a port the kernel hands out for bind(0) or for a connection
    (gloo's, the other worker's) can be taken again before the launcher binds it."""
    for port in _PORTS:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    with socket.socket() as s:  # a fourth worker, or 4,000 launches in one worker
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    cmd: list[str], *, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`cmd` in the repository with a deadline. It runs in a session of its own, so that on the
    deadline (or any failure of the test while it runs) the whole tree is killed: a launcher's
    workers too, which killing the launcher alone would leave running."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    full_env["PATH"] = f"{BIN}:{full_env.get('PATH', '')}"
    with subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # the deadline, or Ctrl-C / pytest-timeout in the test
            kill_session(proc.pid)
            proc.communicate()
            raise
        kill_session(proc.pid)  # anything it left behind
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_session(leader: int) -> None:
    """SIGKILL to every process of the session (process group) that `leader` started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, signal.SIGKILL)


def script(name: str) -> str:
    return str(REPO / "scripts" / name)


def script_main(name: str) -> Any:
    """The `main(argv)` of scripts/<name>, to run an entry point in-process (cheaper than a
    subprocess where the launch itself is not what a test is about)."""
    spec = importlib.util.spec_from_file_location(
        f"script_{name.removesuffix('.py')}", REPO / "scripts" / name
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def benchmark_module(name: str) -> Any:
    """benchmarks/<name> as a module (the benchmarks import their shared `common` module)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name.removesuffix('.py')}", REPO / "benchmarks" / name)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def deepspeed_cmd(nproc: int, *args: str) -> list[str]:
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        script("pretrain.py"),
        *args,
    ]


def launch_cmd(nproc: int, *args: str) -> list[str]:
    """pretrain.py on `nproc` processes with the cheapest launcher: plain python for one, torchrun for
    several (each `deepspeed` launch spends ~7 s importing DeepSpeed twice before the workers start;
    the tests that are about the deepspeed launcher use `deepspeed_cmd`)."""
    if nproc == 1:
        return [str(BIN / "python"), script("pretrain.py"), *args]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            script("pretrain.py"), *args]  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return TOKENIZER


@pytest.fixture(scope="session")
def builtin_prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus tokenized with the shipped tokenizer (built once per test session)."""
    from llm.data.builtin_corpus import iter_documents
    from llm.data.preprocess import preprocess
    from llm.data.sources import Record

    out = tmp_path_factory.mktemp("builtin") / "builtin_text_document"
    records = (Record("str", t, "builtin", i) for i, t in enumerate(iter_documents(), 1))
    preprocess(records, tokenizer=str(TOKENIZER), output_prefix=out, workers=1, progress=False)
    return out


ITERS = 10


def tiny_args(prefix: Path, run_dir: Path, *extra: str) -> list[str]:
    """pretrain.py arguments for the tiny model on the built-in corpus, ITERS iterations."""
    return [
        "--config", "configs/tiny_cpu.yaml", *TINY_OVERRIDES,
        f"data.train_data_path={prefix}", f"logging.dir={run_dir}", f"train.train_iters={ITERS}", *extra,
    ]  # fmt: skip


def check(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def assert_same_curve(got: list[float], ref: list[float], tol: float) -> None:
    assert len(got) == len(ref)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert worst < tol, f"relative difference {worst:.2e}: {got} vs {ref}"


def assert_zero_stage(run_dir: Path, stage: int, accumulation: int = 2) -> None:
    """The DeepSpeed config the run derived: this ZeRO stage, at DP 2 (micro 2, global 8) 2 steps."""
    config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert config["gradient_accumulation_steps"] == accumulation


@pytest.fixture(scope="session")
def reference_run(builtin_prefix: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one plain `python` process (TP 1, DP 1), global batch 8 as 4 micro-batches of 2."""
    run_dir = tmp_path_factory.mktemp("ref")
    check(run(["python", script("pretrain.py"), *tiny_args(builtin_prefix, run_dir)]))
    assert len(train_losses(run_dir)) == ITERS
    return run_dir


@pytest.fixture(scope="session")
def single_process_losses(reference_run: Path) -> list[float]:
    return train_losses(reference_run)


LM_EVAL_TASKS = {
    "llm_test_choice": """
task: llm_test_choice
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/choice.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "llm_test_rolling": """
task: llm_test_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: DIR/rolling.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
}


def write_lm_eval_tasks(directory: Path) -> tuple[Path, list[str]]:
    """Two offline lm-eval tasks (`dataset_path: json` on files written here): multiple choice, and
    rolling loglikelihood over texts longer and shorter than the tiny models' context."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in LM_EVAL_TASKS.items():
        (directory / f"{name}.yaml").write_text(text.replace("DIR", str(directory)))
    questions = [("The list type is a", [" mutable sequence.", " kind of fish.", " number."], 0),
                 ("def f():\n    return", [" 1", " the", "!!"], 0),
                 ("Python is a programming", [" language.", " cat.", " 12345"], 0)]  # fmt: skip
    (directory / "choice.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                                    for q, c, a in questions))  # fmt: skip
    long_text = "Lists are mutable sequences, typically used to store collections of items. " * 8
    (directory / "rolling.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                     ["x = [1, 2]", "The dict type maps keys to values.", long_text]))  # fmt: skip
    return directory, list(LM_EVAL_TASKS)


def megatron_core_indexed():  # type: ignore[no-untyped-def]
    """Megatron-Core's own indexed_dataset module (the real reader and writer of the format)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@pytest.fixture(scope="session")
def megatron_prefix(builtin_prefix: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus rewritten by Megatron-Core's IndexedDatasetBuilder, each document as
    sentence-like sequences of up to 40 tokens (as Megatron's --split-sentences makes), int32."""
    import numpy as np
    import torch

    from llm.data.indexed_dataset import IndexedDataset

    mi = megatron_core_indexed()
    ours = IndexedDataset(builtin_prefix)
    out = tmp_path_factory.mktemp("megatron") / "builtin_megatron"
    builder = mi.IndexedDatasetBuilder(f"{out}.bin", dtype=np.int32)
    for doc in range(len(ours)):
        tokens = np.asarray(ours[doc], dtype=np.int64)
        lengths = [min(40, len(tokens) - s) for s in range(0, len(tokens), 40)]
        builder.add_document(torch.from_numpy(tokens), lengths)
    builder.finalize(f"{out}.idx")
    return out
