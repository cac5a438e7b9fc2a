"""bf16, the GPU default, through DeepSpeed's bf16 paths on CPU at tiny size: ZeRO 0 (DeepSpeed's
unfused mixed-precision optimizer with fp32 masters), ZeRO 1 and 2 (flat fp32 partitions) and a
2-stage pipeline train, resume exactly at the same layout, and resume at another layout with the
fp32 master weights and AdamW moments converted (not the bf16-rounded weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_same_curve, check, launch_cmd, read_metrics, run, tiny_args, train_losses

pytestmark = [pytest.mark.integration, pytest.mark.distributed]
BF16 = "train.precision=bf16"
ZERO = "deepspeed_config=configs/deepspeed/zero{}.json".format
PP2 = "parallel.pipeline_model_parallel_size=2"


def _train(nproc: int, prefix: Path, run_dir: Path, *extra: str) -> str:
    p = run(launch_cmd(nproc, *tiny_args(prefix, run_dir, BF16, *extra)))
    check(p)
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def bf16_reference(builtin_prefix: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Ten uninterrupted bf16 iterations, one process, ZeRO 0."""
    run_dir = tmp_path_factory.mktemp("bf16_ref")
    _train(1, builtin_prefix, run_dir)
    return train_losses(run_dir)


def test_bf16_zero0_resumes_exactly_and_at_zero2_over_two_ranks(
    builtin_prefix: Path, tmp_path: Path, bf16_reference: list[float]
) -> None:
    same, other = tmp_path / "same", tmp_path / "other"
    _train(1, builtin_prefix, same, "train.exit_interval=5")
    shutil.copytree(same, other)
    _train(1, builtin_prefix, same)
    assert train_losses(same) == bf16_reference  # bit for bit: weights, fp32 masters, moments, data, RNG
    log = _train(2, builtin_prefix, other, ZERO(2))
    assert "resharding model and optimizer state" in log
    assert [r["consumed_samples"] for r in read_metrics(other) if "loss" in r] == [8 * i for i in range(1, 11)]
    # bf16 sums in another order over 2 ranks (measured 6e-6); continuing from the bf16-rounded weights
    # instead of the fp32 masters would be 1.4e-4 off
    assert_same_curve(train_losses(other), bf16_reference, 5e-5)


def test_bf16_pipeline_with_zero1_resumes_exactly_and_at_one_process(
    builtin_prefix: Path, tmp_path: Path, bf16_reference: list[float]
) -> None:
    whole, same, other = tmp_path / "whole", tmp_path / "same", tmp_path / "other"
    _train(2, builtin_prefix, whole, PP2, ZERO(1))
    _train(2, builtin_prefix, same, PP2, ZERO(1), "train.exit_interval=5")
    shutil.copytree(same, other)
    _train(2, builtin_prefix, same, PP2, ZERO(1))
    assert train_losses(same) == train_losses(whole)
    # bf16 rounds gradients accumulated over micro-batches and stages differently than one process:
    # the pipeline's curve stays within 1% of the reference
    assert_same_curve(train_losses(whole), bf16_reference, 1e-2)
    log = _train(1, builtin_prefix, other)  # PP 2 ZeRO 1 -> one process, ZeRO 0 (fp32 masters there)
    assert "resharding model and optimizer state" in log
    assert_same_curve(train_losses(other), train_losses(whole), 5e-5)  # measured 4e-6
