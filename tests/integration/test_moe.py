"""configs/tiny_moe_cpu.yaml through the real launchers with expert parallelism 2: it trains and logs
the MoE statistics, resumes exactly from its checkpoints (every expert-parallel rank's experts come
back), resumes at EP 1 on one process on the same curve, and evaluates at one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import check, deepspeed_cmd, launch_cmd, read_metrics, run, script

pytestmark = [pytest.mark.integration, pytest.mark.distributed]
SMALL = [
    "--config", "configs/tiny_moe_cpu.yaml", "model.num_layers=2", "model.hidden_size=64",
    "model.num_attention_heads=2", "model.num_query_groups=1", "model.seq_length=64", "model.moe_ffn_hidden_size=64",
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr_warmup_iters=1", "train.train_iters=4",
    "checkpoint.save_interval=2", "eval.eval_interval=100", "eval.eval_iters=1", "logging.log_interval=1",
    "logging.wandb_mode=disabled",
]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}  # later records win


@pytest.mark.parametrize("zero, launcher, tp", [(0, "deepspeed", 1), (1, "torchrun", 1), (1, "torchrun", 2)])
def test_tiny_moe_trains_with_expert_parallelism_and_resumes_exactly(
    builtin_prefix: Path, tmp_path: Path, zero: int, launcher: str, tp: int
) -> None:
    """ZeRO 0: the expert shards llm writes are the only copy of expert-parallel rank 1's experts;
    ZeRO 1: DeepSpeed's partitions hold them too. TP 2 (EP 1): resumed at TP 1."""
    ep = 2 // tp
    args = [*SMALL, f"data.train_data_path={builtin_prefix}", f"logging.dir={tmp_path}",
            f"deepspeed_config=configs/deepspeed/zero{zero}.json", f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.expert_model_parallel_size={ep}"]  # fmt: skip
    command = deepspeed_cmd if launcher == "deepspeed" else launch_cmd
    check(run(command(2, *args, *([f"logging.tensorboard_dir={tmp_path / 'tb'}"] if zero == 0 else []))))
    records = read_metrics(tmp_path)
    first = _losses(tmp_path)
    assert sorted(first) == [1, 2, 3, 4]
    step = next(r for r in records if "loss" in r)
    assert {"moe_load_balancing_loss", "moe_z_loss", "moe_load_imbalance", "moe_dropped_fraction",
            "moe/layer1/load_imbalance"} <= set(step)  # fmt: skip
    assert step["moe_load_imbalance"] >= 1.0 and step["moe_dropped_fraction"] == 0.0  # dropless
    if zero == 0:  # TensorBoard has them too (wandb gets the same numbers: MetricsLogger.log)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tb = EventAccumulator(str(tmp_path / "tb"))
        tb.Reload()
        assert {"train/moe_load_balancing_loss", "train/moe/layer1/load_imbalance"} <= set(tb.Tags()["scalars"])
    tag = tmp_path / "checkpoints" / "iter_0000002"
    assert json.loads((tag / "llm_meta.json").read_text())["expert_parallel"] == ep
    if ep == 2:
        assert sorted(p.name for p in (tag / "experts").iterdir()) == ["ep_000_tp_00_pp_00.pt", "ep_001_tp_00_pp_00.pt"]

    shutil.rmtree(tmp_path / "checkpoints" / "iter_0000004")
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000002")
    check(run(command(2, *args)))
    resumed = _losses(tmp_path)
    assert [resumed[i] for i in (3, 4)] == [first[i] for i in (3, 4)]  # bitwise

    # at another layout: one process holding every expert (EP 1, TP 1) continues the same curve
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000002")
    shutil.rmtree(tmp_path / "checkpoints" / "iter_0000004")
    check(run(launch_cmd(1, *args, "parallel.expert_model_parallel_size=1", "parallel.tensor_model_parallel_size=1")))
    other = _losses(tmp_path)
    assert max(abs(other[i] - first[i]) / first[i] for i in (3, 4)) < 1e-5, (other, first)
    if zero == 1 and tp == 1:  # and back out: the EP 1 checkpoint of iteration 4 continued at EP 2 and at EP 1
        ckpt = tmp_path / "checkpoints"
        shutil.copytree(ckpt, tmp_path / "saved")
        check(run(launch_cmd(2, *args, "train.train_iters=6")))
        spread = _losses(tmp_path)
        shutil.rmtree(ckpt)
        shutil.copytree(tmp_path / "saved", ckpt)
        check(run(launch_cmd(1, *args, "parallel.expert_model_parallel_size=1", "train.train_iters=6")))
        single = _losses(tmp_path)
        assert max(abs(spread[i] - single[i]) / single[i] for i in (5, 6)) < 1e-5, (spread, single)
    if zero == 0:  # evaluation reads the EP 2 checkpoint at one process
        p = run(["python", script("evaluate.py"), "--checkpoint", str(tmp_path / "checkpoints" / "iter_0000002"),
                 "--data", str(builtin_prefix), "--split", "valid", "--json"])  # fmt: skip
        check(p)
        result = json.loads(p.stdout.strip().splitlines()[-1])
        assert 1.0 < result["perplexity"] < 8000
