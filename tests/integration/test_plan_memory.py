"""The planner's memory estimate against the peak memory real training runs measure (CPU, fp32).

pretrain.py reports `peak_memory_gb` (the largest of any rank; on CPU the peak of anonymous memory
over what is not tensors at the start, see llm/training/memory.py). glibc keeps freed multi-MB
blocks in its heap unless told to mmap them (MALLOC_MMAP_THRESHOLD_), which these runs do so that
resident memory follows live tensor memory as max_memory_allocated does on a GPU. More layouts:
benchmarks/plan_memory.py and docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.planner.memory import GB
from llm.planner.report import estimate_for_run
from tests.conftest import check, launch_cmd, read_metrics, run

pytestmark = [pytest.mark.integration]

MODEL = ["model.num_layers=4", "model.hidden_size=384", "model.num_attention_heads=6", "model.seq_length=256",
         "train.micro_batch_size=4", "train.global_batch_size=8", "train.train_iters=2", "train.lr_warmup_iters=1",
         "logging.log_interval=1", "eval.eval_iters=1", "logging.wandb_mode=disabled",
         "checkpoint.save_interval=null"]  # fmt: skip


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (1, ["model.architecture=llama", "model.num_query_groups=2"]),
        (2, ["parallel.tensor_model_parallel_size=2", "model.sequence_parallel=true",
             "deepspeed_config=configs/deepspeed/zero1.json"]),
    ],
    ids=["llama_gqa_1proc", "gpt2_tp2_sp_zero1"],
)  # fmt: skip
def test_memory_estimate_matches_measured_peak(
    nproc: int, extra: list[str], builtin_prefix: Path, tmp_path: Path
) -> None:
    args = ["--config", "configs/tiny_cpu.yaml", *MODEL, f"data.train_data_path={builtin_prefix}",
            f"logging.dir={tmp_path}", *extra]  # fmt: skip
    check(run(launch_cmd(nproc, *args), env={"MALLOC_MMAP_THRESHOLD_": "65536"}))
    measured = [r["peak_memory_gb"] for r in read_metrics(tmp_path) if "peak_memory_gb" in r][-1]
    estimate = estimate_for_run(tmp_path, precision="fp32").total / GB
    assert measured > 0.1, measured  # the model and its training state, not noise
    assert abs(estimate - measured) / measured < 0.15, f"estimate {estimate:.3f} GB, measured {measured:.3f} GB"
