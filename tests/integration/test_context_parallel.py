"""Context parallelism through the real launchers: C = 2 with ring attention (deepspeed, ZeRO 0) and with
Ulysses (torchrun, ZeRO 2), and TP 2 x C 2, train the curve of one process (training and validation
losses to 1e-5 relative); a C = 2 run resumes exactly, and at C = 1 on the same curve."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import check, deepspeed_cmd, launch_cmd, read_metrics, run

pytestmark = [pytest.mark.integration, pytest.mark.distributed]
SMALL = [
    "--config", "configs/tiny_cpu.yaml", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr_warmup_iters=1",
    "train.train_iters=4", "logging.log_interval=1", "eval.eval_interval=2", "eval.eval_iters=1",
    "checkpoint.save_interval=2", "logging.wandb_mode=disabled",
]  # fmt: skip


def _curve(run_dir: Path) -> dict[str, float]:
    """Training and validation losses by iteration (later records win: a resume's)."""
    out = {}
    for r in read_metrics(run_dir):
        for key in ("loss", "val_loss"):
            if key in r:
                out[f"{key}@{r['iteration']}"] = r[key]
    return out


def _close(got: dict[str, float], ref: dict[str, float]) -> None:
    assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
    worst = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    assert worst < 1e-5, (worst, got, ref)


@pytest.fixture(scope="module")
def one_process(builtin_prefix: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    run_dir = tmp_path_factory.mktemp("cp1")
    check(run(launch_cmd(1, *SMALL, f"data.train_data_path={builtin_prefix}", f"logging.dir={run_dir}")))
    return _curve(run_dir)


@pytest.mark.parametrize(
    "world, extra",
    [(2, ["parallel.cp_comm_type=p2p"]),
     (2, ["parallel.cp_comm_type=a2a", "deepspeed_config=configs/deepspeed/zero2.json"]),
     (4, ["parallel.cp_comm_type=p2p", "parallel.tensor_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero1.json"])],
    ids=["c2_ring_zero0_deepspeed", "c2_ulysses_zero2", "tp2_c2_ring_zero1"],
)  # fmt: skip
def test_context_parallel_runs_train_the_curve_of_one_process(
    world: int, extra: list[str], one_process: dict[str, float], builtin_prefix: Path, tmp_path: Path
) -> None:
    args = [*SMALL, f"data.train_data_path={builtin_prefix}", f"logging.dir={tmp_path}",
            "parallel.context_parallel_size=2", *extra]  # fmt: skip
    command = deepspeed_cmd if "p2p" in extra[0] and world == 2 else launch_cmd
    check(run(command(world, *args)))
    _close(_curve(tmp_path), one_process)
    if "a2a" not in extra[0]:
        return
    first = _curve(tmp_path)
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(ckpt, tmp_path / "saved")
    shutil.rmtree(ckpt / "iter_0000004")
    (ckpt / "latest").write_text("iter_0000002")
    check(run(launch_cmd(world, *args)))
    assert _curve(tmp_path) == first  # exact resume at C = 2
    shutil.rmtree(ckpt)
    shutil.copytree(tmp_path / "saved", ckpt)
    shutil.rmtree(ckpt / "iter_0000004")
    (ckpt / "latest").write_text("iter_0000002")
    check(run(launch_cmd(1, *args, "parallel.context_parallel_size=1")))  # C = 2 -> 1
    _close(_curve(tmp_path), one_process)


@pytest.mark.parametrize("comm", ["p2p", "a2a"])
def test_document_aware_training_at_c2_trains_the_curve_of_one_process(
    comm: str, builtin_prefix: Path, tmp_path: Path
) -> None:
    """Attention and positions per document, EOD loss masked: every rank computes the document ids of
    the whole sequence; Ulysses attends per document over whole sequences, the ring masks each block
    by document."""
    docs = ["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"]
    args = [*SMALL, f"data.train_data_path={builtin_prefix}", *docs]
    check(run(launch_cmd(1, *args, f"logging.dir={tmp_path / 'one'}")))
    check(run(launch_cmd(2, *args, f"logging.dir={tmp_path / 'cp'}", "parallel.context_parallel_size=2",
                         f"parallel.cp_comm_type={comm}")))  # fmt: skip
    _close(_curve(tmp_path / "cp"), _curve(tmp_path / "one"))
