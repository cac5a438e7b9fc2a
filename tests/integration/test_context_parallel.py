"""Context parallelism through the real launchers: C = 2 with ring attention (deepspeed, ZeRO 0, compiled blocks;
its checkpoint's model for evaluation is the eager one) and with Ulysses (torchrun, ZeRO 2), TP 2 x C 2, PP 2
x C 2 and DP 2 x C 2 at ZeRO 3 train the curve of one process (training and validation losses to 1e-5
relative); C = 2 runs at ZeRO 2 and 3 resume exactly, and at C = 1 on the same curve. C = 2 composes with
document-aware training, a mixture of experts (with EP 2 and with PP 2) and DiLoCo islands, each on the curve
of its C = 1 run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llm.checkpoint.merge import load_trained_model
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


@pytest.fixture(scope="session")  # once per pytest worker, whichever tests run in between
def one_process(builtin_prefix: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    run_dir = tmp_path_factory.mktemp("cp1")
    check(run(launch_cmd(1, *SMALL, f"data.train_data_path={builtin_prefix}", f"logging.dir={run_dir}")))
    return _curve(run_dir)


@pytest.mark.parametrize(
    "world, extra",
    [(2, ["parallel.cp_comm_type=p2p", "model.compile=true"]),
     (2, ["parallel.cp_comm_type=a2a", "deepspeed_config=configs/deepspeed/zero2.json"]),
     (4, ["parallel.cp_comm_type=p2p", "parallel.tensor_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero1.json"]),
     (4, ["parallel.cp_comm_type=p2p", "parallel.pipeline_model_parallel_size=2"]),
     (4, ["parallel.cp_comm_type=p2p", "deepspeed_config=configs/deepspeed/zero3.json"])],
    ids=["c2_ring_zero0_compiled_deepspeed", "c2_ulysses_zero2", "tp2_c2_ring_zero1", "pp2_c2_ring", "dp2_c2_ring_zero3"],
)  # fmt: skip
def test_context_parallel_runs_train_the_curve_of_one_process(
    world: int, extra: list[str], one_process: dict[str, float], builtin_prefix: Path, tmp_path: Path
) -> None:
    args = [*SMALL, f"data.train_data_path={builtin_prefix}", f"logging.dir={tmp_path}",
            "parallel.context_parallel_size=2", *extra]  # fmt: skip
    command = deepspeed_cmd if "p2p" in extra[0] and world == 2 else launch_cmd
    check(run(command(world, *args)))
    _close(_curve(tmp_path), one_process)
    if "model.compile=true" in extra:
        # the checkpoint's model for evaluation and generation is the eager one (compiling each new
        # shape of decoding made generation 8x slower on CPU)
        cfg, model = load_trained_model(tmp_path / "checkpoints")
        assert not cfg.model.compile
        assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in model.layers)
    if "a2a" not in extra[0] and "zero3" not in extra[-1]:  # the resumes: at ZeRO 2 and 3
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


MOE = ["model.architecture=llama", "model.num_query_groups=2", "model.num_experts=4", "model.moe_router_topk=2",
       "model.moe_ffn_hidden_size=64", "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001",
       "model.moe_router_load_balancing_type=seq_aux_loss"]  # fmt: skip


def _moe_curve(run_dir: Path) -> dict[str, float]:
    """The losses and the MoE statistics (auxiliary losses summed over the CP ranks' parts, the load
    over every token) by iteration."""
    out = _curve(run_dir)
    for r in read_metrics(run_dir):
        for key in ("moe_load_balancing_loss", "moe_z_loss", "moe_load_imbalance"):
            if key in r:
                out[f"{key}@{r['iteration']}"] = r[key]
    return out


def test_mixture_of_experts_at_c2_trains_the_curve_of_one_process(builtin_prefix: Path, tmp_path: Path) -> None:
    """Routing on each rank's chunks, the sequence-wise balancing loss from the expert counts summed over
    CP: EP 2 x C 2 at ZeRO 1 (expert gradients reduced over EDP x CP) and PP 2 x C 2 (the auxiliary
    losses' gradients scaled as the LM loss's) match one process, statistics included."""
    args = [*SMALL, f"data.train_data_path={builtin_prefix}", *MOE]
    check(run(launch_cmd(1, *args, f"logging.dir={tmp_path / 'one'}")))
    ref = _moe_curve(tmp_path / "one")
    assert any(k.startswith("moe_load_balancing_loss@") for k in ref)
    for name, extra in [("ep2", ["parallel.expert_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero1.json"]),
                        ("pp2", ["parallel.pipeline_model_parallel_size=2"])]:  # fmt: skip
        check(run(launch_cmd(4, *args, f"logging.dir={tmp_path / name}", "parallel.context_parallel_size=2", *extra)))
        _close(_moe_curve(tmp_path / name), ref)


def test_diloco_islands_at_c2_train_the_curve_of_islands_at_c1(builtin_prefix: Path, tmp_path: Path) -> None:
    """2 islands x C 2 (each island a context-parallel pair) against 2 islands of one process each."""
    args = [*SMALL, f"data.train_data_path={builtin_prefix}", "parallel.diloco.islands=2", "parallel.diloco.inner_steps=2"]
    check(run(launch_cmd(2, *args, f"logging.dir={tmp_path / 'c1'}")))
    check(run(launch_cmd(4, *args, f"logging.dir={tmp_path / 'c2'}", "parallel.context_parallel_size=2")))
    _close(_curve(tmp_path / "c2"), _curve(tmp_path / "c1"))
