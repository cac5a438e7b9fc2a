"""Training recipes through the real entry point: a batch-size ramp-up (its per-iteration batches and
data position, an exact resume in the middle of the ramp, DP 2 against one process) and a WSD
cool-down branched from a stable-phase checkpoint (the rates the optimizer used)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_same_curve, check, launch_cmd, read_metrics, run, tiny_args, train_losses
from tests.unit.test_lr_schedule import megatron_rampup_table

pytestmark = pytest.mark.integration

# global batch 12 from 4 in steps of 4 over 24 samples (micro-batch 2: 1 process accumulates 2 to 6
# micro-batches, DP 2 one to three each)
RAMP = ["train.global_batch_size=12", "train.rampup_batch_size=[4, 4, 24]", "train.train_iters=8",
        "train.lr_warmup_iters=2", "logging.log_interval=1", "eval.eval_interval=100"]  # fmt: skip


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_a_batch_rampup_grows_the_batch_resumes_exactly_and_is_the_same_at_dp2(builtin_prefix: Path, tmp_path: Path) -> None:
    straight, resumed, dp2 = tmp_path / "straight", tmp_path / "resumed", tmp_path / "dp2"
    check(run(launch_cmd(1, *tiny_args(builtin_prefix, straight, *RAMP, "checkpoint.save_interval=3"))))
    steps = _steps(straight)
    sizes = megatron_rampup_table(4, 4, 24, 12, 8)
    assert sizes == [4, 4, 4, 8, 8, 12, 12, 12]  # the ramp this test is about
    assert [r["global_batch_size"] for r in steps] == sizes
    assert [r["consumed_samples"] for r in steps] == [sum(sizes[: i + 1]) for i in range(8)]
    accumulation = json.loads((straight / "deepspeed_config.json").read_text())["gradient_accumulation_steps"]
    assert accumulation == 6  # DeepSpeed is set up for the full batch; each step sets its own

    # resume at iteration 3, before the batch grows to 8: bitwise the same steps
    ckpt = straight / "checkpoints" / "iter_0000003"
    check(run(launch_cmd(1, *tiny_args(builtin_prefix, resumed, *RAMP, f"checkpoint.resume={ckpt}"))))
    assert train_losses(resumed) == train_losses(straight)[3:]
    assert [(r["lr"], r["global_batch_size"], r["consumed_samples"]) for r in _steps(resumed)] == [
        (r["lr"], r["global_batch_size"], r["consumed_samples"]) for r in steps[3:]
    ]

    # two data-parallel ranks split every step's batch: the curve of one process
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, dp2, *RAMP))))
    assert [r["global_batch_size"] for r in _steps(dp2)] == sizes
    assert_same_curve(train_losses(dp2), train_losses(straight), 1e-4)


def test_a_wsd_cooldown_branches_from_a_stable_phase_checkpoint(builtin_prefix: Path, tmp_path: Path) -> None:
    """A WSD run planned for 20 iterations (decay over its last 4) stops at 6, in the stable phase. A
    branch resumes that checkpoint into its own run directory as a cool-down ending at 9: the rates its
    optimizer used are the stable rate, then the linear decay over iterations 7-9 to min_lr, and
    the change of plan is recorded."""
    main, branch = tmp_path / "main", tmp_path / "cool_at_6"
    wsd = ["train.lr_decay_style=WSD", "train.lr_wsd_decay_style=linear", "train.lr_warmup_iters=2",
           "train.lr=2e-3", "train.min_lr=2e-4"]  # fmt: skip
    check(run(launch_cmd(1, *tiny_args(builtin_prefix, main, *wsd, "train.train_iters=20", "train.lr_wsd_decay_iters=4",
                                       "train.exit_interval=6"))))  # fmt: skip
    assert [r["lr"] for r in _steps(main)] == pytest.approx([1e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3], rel=1e-12)
    ckpt = main / "checkpoints" / "iter_0000006"
    p = run(launch_cmd(1, *tiny_args(builtin_prefix, branch, *wsd, "train.train_iters=9", "train.lr_wsd_decay_iters=3",
                                     f"checkpoint.resume={ckpt}")))  # fmt: skip
    check(p)
    lrs = [r["lr"] for r in _steps(branch)]
    assert [r["iteration"] for r in _steps(branch)] == [7, 8, 9]
    assert lrs == pytest.approx([2e-4 + 1.8e-3 * (1 - k / 3) for k in range(3)], rel=1e-12)
    history = [json.loads(line) for line in (branch / "config_history.jsonl").read_text().splitlines()]
    assert "train.train_iters: 20 -> 9" in history[0]["changes"]
    assert "train.lr_wsd_decay_iters: 4 -> 3" in history[0]["changes"]
    assert (branch / "checkpoints" / "latest").read_text().strip() == "iter_0000009"
    assert not (main / "checkpoints" / "iter_0000009").exists()  # the main run's directory is untouched

    # the README's form: the branch keeps train_iters (the main run's sample order) and ends its decay
    # and itself at 9 (lr_decay_iters, exit_interval), with a checkpoint and an evaluation there
    same_order = tmp_path / "cool_at_6_same_order"
    p = run(launch_cmd(1, *tiny_args(builtin_prefix, same_order, *wsd, "train.train_iters=20", "train.lr_decay_iters=9",
                                     "train.lr_wsd_decay_iters=3", "train.exit_interval=9", "eval.eval_interval=9",
                                     f"checkpoint.resume={ckpt}")))  # fmt: skip
    check(p)
    assert [r["lr"] for r in _steps(same_order)] == lrs
    assert "stopped at iteration 9 (train.exit_interval=9)" in p.stdout
    assert [r["iteration"] for r in read_metrics(same_order) if "val_loss" in r] == [9]
    assert (same_order / "checkpoints" / "latest").read_text().strip() == "iter_0000009"


MUON = ["train.optimizer=muon", "train.train_iters=8", "train.lr_decay_style=WSD", "train.lr_wsd_decay_iters=3",
        "eval.eval_interval=100"]  # fmt: skip


def test_muon_is_the_same_at_tp2_and_pp2_and_resumes_exactly_and_at_another_layout(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """Muon orthogonalizes whole matrices: TP 2 (the shards gathered) and PP 2 (each stage its own
    layers) train the curve of one process to 1e-5; a resume is bitwise at the same layout, and at TP 2
    from the one-process checkpoint (momentum buffers through the universal form) continues the curve."""
    one, tp2, pp2 = tmp_path / "one", tmp_path / "tp2", tmp_path / "pp2"
    resumed, resharded = tmp_path / "resumed", tmp_path / "resharded"
    check(run(launch_cmd(1, *tiny_args(builtin_prefix, one, *MUON, "checkpoint.save_interval=4"))))
    ref = train_losses(one)
    assert len(ref) == 8 and ref[-1] < ref[0] - 0.5  # it learns
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, tp2, *MUON, "parallel.tensor_model_parallel_size=2"))))
    assert_same_curve(train_losses(tp2), ref, 1e-5)
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, pp2, *MUON, "parallel.pipeline_model_parallel_size=2"))))
    assert_same_curve(train_losses(pp2), ref, 1e-5)
    ckpt = one / "checkpoints" / "iter_0000004"
    check(run(launch_cmd(1, *tiny_args(builtin_prefix, resumed, *MUON, f"checkpoint.resume={ckpt}"))))
    assert train_losses(resumed) == ref[4:]
    check(run(launch_cmd(2, *tiny_args(builtin_prefix, resharded, *MUON, f"checkpoint.resume={ckpt}",
                                       "parallel.tensor_model_parallel_size=2"))))  # fmt: skip
    assert_same_curve(train_losses(resharded), ref[4:], 1e-5)
    assert (ckpt / "universal").is_dir()


def test_muon_is_not_worse_than_adamw_on_held_out_data(builtin_prefix: Path, tmp_path: Path) -> None:
    """The benchmark's quality check at a size the suite affords: 150 iterations of the tiny model with
    WSD (1 - sqrt cool-down), AdamW against Muon at the same rate, 20 held-out batches. Measured:
    AdamW 6.32, Muon 6.01 (benchmarks/recipes.py on the quickstart model: docs/benchmarks.md)."""
    losses = {}
    for optimizer in ("adamw", "muon"):
        run_dir = tmp_path / optimizer
        check(run(launch_cmd(1, *tiny_args(builtin_prefix, run_dir, "train.train_iters=150", "train.micro_batch_size=8",
                                           "train.lr_warmup_iters=10", "train.lr_decay_style=WSD",
                                           "train.lr_wsd_decay_style=minus_sqrt", "eval.eval_iters=20",
                                           "eval.eval_interval=150", "logging.log_interval=50",
                                           f"train.optimizer={optimizer}"))))  # fmt: skip
        losses[optimizer] = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]
    assert losses["muon"] <= losses["adamw"], losses
