"""Shared fixtures: the shipped tokenizer, a token file of the built-in corpus, subprocess helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    cmd: list[str], *, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    full_env["PATH"] = f"{BIN}:{full_env.get('PATH', '')}"
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def script(name: str) -> str:
    return str(REPO / "scripts" / name)


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
