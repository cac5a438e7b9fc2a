"""A checkpoint someone shares runs no code: a payload pickled into its files, with the MANIFEST
recomputed to match (as anyone can), is refused by every tool that reads checkpoints, before the
payload runs; with the documented trust setting it loads (and the payload runs: the test's payload
is real)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from llm.checkpoint.format import write_manifest
from tests.conftest import TINY_OVERRIDES, run, script, script_main

pytestmark = [pytest.mark.integration]


class _Payload:
    """Unpickling this runs a shell command (what an attacker would put into a checkpoint)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def _poison(tag_dir: Path, name: str, marker: Path) -> None:
    file = tag_dir / name
    state = torch.load(file, weights_only=False)  # our own file, trusted here
    state["extra"] = _Payload(f"touch '{marker}'")
    torch.save(state, file)
    write_manifest(tag_dir)  # checksums match the payload: verification cannot tell


@pytest.mark.parametrize("poisoned", ["mp_rank_00_model_states.pt", "rng/rank_00000.pt"])
def test_a_shared_checkpoint_with_a_payload_runs_no_code(
    reference_run: Path, builtin_prefix: Path, tmp_path: Path, poisoned: str, capsys: pytest.CaptureFixture
) -> None:
    shared = tmp_path / "shared"
    shutil.copytree(reference_run / "checkpoints", shared)
    tag_dir = shared / (shared / "latest").read_text().strip()
    marker = tmp_path / "payload_ran"
    _poison(tag_dir, poisoned, marker)
    refusal = f"error: checkpoint file '{tag_dir / poisoned}' needs the type 'posix.system' to load"

    tools = {
        "evaluate.py": ["--checkpoint", str(shared), "--data", str(builtin_prefix), "--split", "valid"],
        "generate.py": ["--checkpoint", str(shared), "--prompt", "The list", "--max-new-tokens", "2"],
        "convert_to_hf.py": ["--checkpoint", str(shared), "--output", str(tmp_path / "hf")],
    }
    if poisoned.startswith("rng/"):
        tools = {}  # the tools read model weights only; the RNG streams are read by a resume
    for name, argv in tools.items():
        assert script_main(name)(argv) == 1, name
        err = capsys.readouterr().err
        assert refusal in err and "checkpoint.trust_pickles=true" in err and err.count("\n") == 1, err
        assert not marker.exists(), f"{name} ran the payload"

    resume = ["--config", "configs/tiny_cpu.yaml", *TINY_OVERRIDES, f"data.train_data_path={builtin_prefix}",
              f"logging.dir={tmp_path / 'resumed'}", "train.train_iters=12", f"checkpoint.resume={shared}"]  # fmt: skip
    p = run(["python", script("pretrain.py"), *resume])
    assert p.returncode == 1 and refusal in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not marker.exists(), "a resume ran the payload"

    # The payload is real: trusting the checkpoint runs it (what every load did before).
    if tools:
        assert script_main("generate.py")([*tools["generate.py"], "--trust-pickles"]) == 0
    else:
        p = run(
            [
                "python",
                script("pretrain.py"),
                *resume,
                "checkpoint.trust_pickles=true",
                "train.train_iters=11",
            ]
        )
        assert p.returncode == 0, p.stderr[-3000:]
    assert marker.exists()
