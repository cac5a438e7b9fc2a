"""DiLoCo islands through the real entry point (torchrun, gloo): one inner step per round is
synchronous training, a resume in the middle of a round (an exchange in flight) is bitwise exact,
and a checkpoint keeps its number of islands. The outer step itself is checked against a
simulation in tests/distributed/test_diloco.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.checkpoint.merge import load_trained_model
from tests.conftest import check, launch_cmd, read_metrics, run, tiny_args, train_losses

pytestmark = [pytest.mark.integration, pytest.mark.distributed]
ISLANDS = "parallel.diloco.islands=2"


def test_one_inner_step_per_round_is_synchronous_data_parallel(builtin_prefix: Path, tmp_path: Path) -> None:
    """2 islands x PP 2, inner_steps 1, outer lr 1, no outer momentum: each round averages the islands'
    one-step updates. With SGD (and its momentum, which is linear in the gradients) as the inner
    optimizer and no clipping that is exactly ordinary DP 2 x PP 2 over the same 4 ranks. (With AdamW
    it is not: the mean of two Adam updates is not the Adam update of the mean gradient.)"""
    common = ["train.optimizer=sgd", "train.sgd_momentum=0.9", "train.lr=0.3", "train.clip_grad=0",
              "train.train_iters=8", "parallel.pipeline_model_parallel_size=2"]  # fmt: skip
    sync, islands = tmp_path / "sync", tmp_path / "islands"
    check(run(launch_cmd(4, *tiny_args(builtin_prefix, sync, *common))))
    diloco = [
        ISLANDS,
        "parallel.diloco.inner_steps=1",
        "parallel.diloco.outer_lr=1",
        "parallel.diloco.outer_momentum=0",
    ]
    check(run(launch_cmd(4, *tiny_args(builtin_prefix, islands, *common, *diloco))))
    want, got = train_losses(sync), train_losses(islands)
    assert len(got) == len(want) == 8 and want[-1] < want[0] - 0.05  # it learns
    worst = max(abs(a - b) / b for a, b in zip(got, want))
    assert worst < 1e-6, f"relative difference {worst:.2e}: {got} vs {want}"
    outer = [r for r in read_metrics(islands) if "diloco_outer_grad_norm" in r]
    assert [r["iteration"] for r in outer] == list(range(1, 9)) and all(
        r["diloco_bytes_sent"] > 0 for r in outer
    )


def test_resume_in_the_middle_of_a_round_is_bitwise_exact(builtin_prefix: Path, tmp_path: Path) -> None:
    """Streaming (2 fragments, delay 1) with int8 exchange and error feedback at ZeRO 1: the checkpoint
    of iteration 6 holds fragment 1's exchange in flight (started at 6, lands at 7), the outer
    momentum and the residuals; the resumed run repeats iterations 7-8 bitwise."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [ISLANDS, "parallel.diloco.inner_steps=4", "parallel.diloco.fragments=2", "parallel.diloco.delay=1",
            "parallel.diloco.exchange=int8", "deepspeed_config=configs/deepspeed/zero1.json", "train.train_iters=8",
            "model.dropout=0.1"]  # fmt: skip
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, straight, *args, "checkpoint.save_interval=6"))))
    ckpt = straight / "checkpoints" / "iter_0000006"
    assert (ckpt / "island_1" / "iter_0000006").is_dir() and len(list((ckpt / "diloco").iterdir())) == 2
    p = run(launch_cmd(2, *tiny_args(builtin_prefix, resumed, *args, f"checkpoint.resume={ckpt}")))
    check(p)
    assert train_losses(resumed) == train_losses(straight)[6:]

    def outer(d: Path) -> list[tuple[int, float, list[int]]]:
        return [(r["iteration"], r["diloco_outer_grad_norm"], r["diloco_fragments"])
                for r in read_metrics(d) if "diloco_outer_grad_norm" in r and r["iteration"] > 6]  # fmt: skip

    assert outer(resumed) == outer(straight) and outer(straight)[0][0] == 7  # the in-flight one landed at 7
    val = [[r["val_loss"] for r in read_metrics(d) if "val_loss" in r][-1] for d in (straight, resumed)]
    assert val[0] == val[1]

    # evaluation and export read island 0's weights (after the final sync every island holds them)
    cfg, model = load_trained_model(straight / "checkpoints")
    assert cfg.parallel.diloco.islands == 2 and sum(p.numel() for p in model.parameters()) > 0

    # a run keeps its islands: resuming at another number is one clear message
    p = run(
        launch_cmd(1, *tiny_args(builtin_prefix, tmp_path / "sync", *args[1:], f"checkpoint.resume={ckpt}"))
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "written with parallel.diloco.islands = 2 and this run has 1" in p.stdout + p.stderr
