"""bf16, the GPU default, through DeepSpeed's bf16 paths on CPU at tiny size: ZeRO 0 (DeepSpeed's
unfused mixed-precision optimizer with fp32 masters), ZeRO 1 (flat fp32 partitions) with a 2-stage
pipeline, and ZeRO 2 over two ranks train, resume bit for bit at the same layout (ZeRO 0), and
resume at another layout with the fp32 master weights and AdamW moments converted (not the
bf16-rounded weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same_curve, check, launch_cmd, read_metrics, run, tiny_args, train_losses

pytestmark = [pytest.mark.integration, pytest.mark.distributed]
ZERO = "deepspeed_config=configs/deepspeed/zero{}.json".format
PP2 = "parallel.pipeline_model_parallel_size=2"


def _train(nproc: int, prefix: Path, run_dir: Path, *extra: str) -> str:
    args = tiny_args(prefix, run_dir, "train.precision=bf16", "train.train_iters=6", *extra)
    p = run(launch_cmd(nproc, *args))
    check(p)
    return p.stdout + p.stderr


@pytest.mark.parametrize(
    "first, other",
    [((1, []), (2, [ZERO(2)])), ((2, [PP2, ZERO(1)]), (1, []))],
    ids=["zero0_then_dp2_zero2", "pp2_zero1_then_one_process_zero0"],
)
def test_bf16_resumes_exactly_and_at_another_layout(
    first: tuple[int, list[str]], other: tuple[int, list[str]], builtin_prefix: Path, tmp_path: Path
) -> None:
    """Six iterations straight, saving at three; from that checkpoint the same layout trains four to
    six bit for bit, another layout within 5e-5 (bf16 sums in another order: measured 4e-6 to 6e-6;
    continuing from the bf16-rounded weights instead of the fp32 masters is 2e-4 off)."""
    (n1, a1), (n2, a2) = first, other
    straight = tmp_path / "straight"
    _train(n1, builtin_prefix, straight, *a1, "checkpoint.save_interval=3")
    ckpt = f"checkpoint.resume={straight / 'checkpoints' / 'iter_0000003'}"
    if n1 == 1:  # the pipeline's exact resume is test_pretrain's [pp2] (fp32: the same engine and files)
        _train(n1, builtin_prefix, tmp_path / "same", *a1, ckpt)
        assert train_losses(tmp_path / "same") == train_losses(straight)[3:]
    log = _train(n2, builtin_prefix, tmp_path / "moved", *a2, ckpt)
    assert "resharding model and optimizer state" in log
    assert [r["consumed_samples"] for r in read_metrics(tmp_path / "moved") if "loss" in r] == [32, 40, 48]
    assert_same_curve(train_losses(tmp_path / "moved"), train_losses(straight)[3:], 5e-5)
