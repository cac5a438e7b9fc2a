"""pretrain.py through the real launchers (deepspeed, torchrun, python) on CPU with gloo.

Multi-node launches (the scripts in scripts/launch/) are in test_multinode.py."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import (
    BIN,
    ITERS,
    assert_same_curve,
    assert_zero_stage,
    check,
    deepspeed_cmd,
    free_port,
    launch_cmd,
    read_metrics,
    run,
    script,
    script_main,
    tiny_args,
    train_losses,
    write_lm_eval_tasks,
)

pytestmark = pytest.mark.integration
_args, _check, _assert_same_curve = tiny_args, check, assert_same_curve


def _perplexity(checkpoint: Path, prefix: Path) -> dict:
    p = run(["python", script("evaluate.py"), "--checkpoint", str(checkpoint), "--data", str(prefix),
             "--split", "valid", "--json"])  # fmt: skip
    _check(p)
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.distributed
def test_two_processes_with_zero3_offload_match_one(
    builtin_prefix: Path, tmp_path: Path, single_process_losses: list[float]
) -> None:
    """ZeRO 3 with optimizer and parameters offloaded to CPU at DP 2. ZeRO 0, 1, 2 and 3 at DP 2 are
    the launcher tests of test_multinode.py (mpirun, torchrun, deepspeed, srun), same tolerance."""
    args = _args(builtin_prefix, tmp_path, "deepspeed_config=configs/deepspeed/zero3_offload.json")
    _check(run(launch_cmd(2, *args)))
    _assert_same_curve(train_losses(tmp_path), single_process_losses, 1e-5)
    assert_zero_stage(tmp_path, 3)


def test_deepspeed_run_learns_logs_checkpoints_resumes_and_evaluates(
    builtin_prefix: Path, megatron_prefix: Path, tmp_path: Path
) -> None:
    """Trains on the built-in corpus as Megatron-Core's own builder wrote it (int32 tokens,
    documents of several sequences): data prepared by Megatron or GPT-NeoX trains as it is."""
    tasks, names = write_lm_eval_tasks(tmp_path / "tasks")
    args = _args(
        megatron_prefix, tmp_path, "train.train_iters=30", "checkpoint.save_interval=20",
        "logging.wandb_mode=offline", "eval.eval_interval=10", f"logging.tensorboard_dir={tmp_path / 'tb'}",
        f"eval.lm_eval_tasks=[{','.join(names)}]", "eval.lm_eval_interval=15", f"eval.lm_eval_include_path={tasks}",
    )  # fmt: skip
    _check(run(deepspeed_cmd(1, *args), env={"WANDB_SILENT": "true"}))
    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in steps] == list(range(1, 31))
    assert set(steps[0]) >= {
        "iteration",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "step_time",
        "consumed_samples",
    }
    assert steps[-1]["consumed_samples"] == 30 * 8 and steps[0]["grad_norm"] > 0
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 1.0, (first, last)
    evals = [r for r in records if "val_loss" in r]
    assert [r["iteration"] for r in evals] == [10, 20, 30] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000030"
    assert (ckpt / "iter_0000020" / "llm_meta.json").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "deepspeed_config.json").is_file()

    # resume: auto picks up iteration 30 and continues to 36
    _check(run(launch_cmd(1, *args, "train.train_iters=36", "train.lr_warmup_iters=2")))  # python resumes it
    resumed = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["iteration"] for r in resumed][30:] == list(range(31, 37))
    assert resumed[-1]["consumed_samples"] == 36 * 8
    assert [r["iteration"] for r in read_metrics(tmp_path) if "resumed_from" in r] == [30]
    scored = [
        r for r in read_metrics(tmp_path) if "lm_eval_seconds" in r
    ]  # lm-eval on rank 0 during training
    assert [r["iteration"] for r in scored] == [15, 30, 36]
    assert all(r["lm_eval/llm_test_rolling/word_perplexity"] > 1 and 0 <= r["lm_eval/llm_test_choice/acc"] <= 1
               for r in scored)  # fmt: skip
    _check_tensorboard_and_plot(tmp_path, resumed)

    result = _perplexity(ckpt, builtin_prefix)
    assert result["tokens"] > 1000 and 1 < result["perplexity"] < 8192
    p = run(
        [
            "python",
            script("generate.py"),
            "--checkpoint",
            str(ckpt),
            "--prompt",
            "The list",
            "--max-new-tokens",
            "10",
        ]
    )
    _check(p)
    assert p.stdout.startswith("The list") and len(p.stdout) > len("The list")
    # Past the context (64 tokens here): refused with the way out, or done as asked and said so.
    generate_main, long_prompt = script_main("generate.py"), "The list type is a sequence. " * 20
    for flags, status, says in [
        (["--max-new-tokens", "10"], 1, "error: the prompt is"),
        (["--max-new-tokens", "10", "--truncate-prompt"], 0,  # room left for all 10 new tokens
         "warning: the prompt was truncated from the left to its last 55 tokens"),
        (["--max-new-tokens", "70", "--truncate-prompt"], 1, "error: the prompt (1 tokens) and --max-new-tokens 70"),
        (["--max-new-tokens", "70", "--truncate-prompt", "--sliding-window"], 0,
         "warning: the prompt was truncated from the left to its last 1 tokens"),
    ]:  # fmt: skip
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            argv = ["--checkpoint", str(ckpt), "--prompt", long_prompt, *flags]
            assert generate_main(argv) == status
        assert err.getvalue().startswith(says), err.getvalue()
    assert "sliding window" in err.getvalue() and out.getvalue().strip()


def _check_tensorboard_and_plot(run_dir: Path, steps: list[dict]) -> None:
    """The TensorBoard events (read with TensorBoard's own reader) hold what metrics.jsonl holds; the
    curves image of this run and of one missing a metric is a PNG of the size asked for."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    loss = tb.Scalars("train/loss")
    assert [e.step for e in loss] == [r["iteration"] for r in steps] == list(range(1, 37))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.step for e in tb.Scalars("val/loss")] == [10, 20, 30, 36]
    assert {
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "val/ppl",
        "events/checkpoint_save_seconds",
    } <= set(tb.Tags()["scalars"])
    assert "config/text_summary" in tb.Tags()["tensors"]
    assert [e.step for e in tb.Scalars("lm_eval/llm_test_rolling/word_perplexity")] == [15, 30, 36]
    by_tokens = EventAccumulator(str(run_dir / "tb" / "by_tokens"))
    by_tokens.Reload()
    assert [e.step for e in by_tokens.Scalars("train/loss vs tokens")] == [i * 8 * 64 for i in range(1, 37)]

    other = run_dir / "other_run"  # the same run without grad norms and with a rollback marked
    other.mkdir()
    lines = [json.dumps({k: v for k, v in r.items() if k != "grad_norm"}) for r in steps]
    lines.insert(10, json.dumps({"iteration": 10, "rollback": 1, "spike_loss": None}))
    (other / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (other / "config.yaml").write_text((run_dir / "config.yaml").read_text())  # its seq_length: tokens
    png = run_dir / "curves.png"
    argv = [str(run_dir), str(other), "--output", str(png), "--size", "800x600", "--log-x", "--names", "a,b"]
    assert script_main("plot_runs.py")(argv) == 0
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (800, 600)
    _check_figure_data(run_dir, other, steps)


def _check_figure_data(run_dir: Path, other: Path, steps: list[dict]) -> None:
    """What the figure draws, read from its lines: per run the training curve at each step's tokens,
    the validation points, the resume (run a, at iteration 30) and rollback (run b, iteration 10)
    markers; run b has no grad-norm line."""
    import matplotlib.pyplot as plt

    from llm.eval.plots import build_figure, read_run

    fig = build_figure([read_run(run_dir, "a"), read_run(other, "b")])
    try:
        loss_ax, _, grad_ax, _ = fig.axes
        lines = {line.get_label(): line for line in loss_ax.get_lines()}
        tokens = [r["consumed_samples"] * 64 for r in steps]
        for name in ("a", "b"):
            x, y = lines[f"{name} (train)"].get_data()
            assert list(x) == pytest.approx(tokens) and list(y) == pytest.approx([r["loss"] for r in steps])
        assert list(lines["a (validation)"].get_data()[0]) == pytest.approx(
            [i * 8 * 64 for i in (10, 20, 30, 36)]
        )
        assert list(lines["a resume"].get_xdata()) == pytest.approx([30 * 8 * 64] * 2)
        assert list(lines["b rollback"].get_xdata()) == pytest.approx([10 * 8 * 64] * 2)
        assert "b resume" not in lines and "a rollback" not in lines
        assert [line.get_label() for line in grad_ax.get_lines()] == ["a"]
    finally:
        plt.close(fig)


def test_lm_eval_during_training_leaves_the_losses_bitwise_equal(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """lm-eval seeds the global random generators; training's streams are saved and restored around
    it, so with dropout on the losses equal those of the same run without it, bit for bit."""
    tasks, names = write_lm_eval_tasks(tmp_path / "tasks")
    common = ["train.train_iters=6", "model.dropout=0.1", "model.attention_dropout=0.1"]
    _check(run(launch_cmd(1, *_args(builtin_prefix, tmp_path / "plain", *common))))
    _check(run(launch_cmd(1, *_args(builtin_prefix, tmp_path / "scored", *common, "eval.lm_eval_interval=2",
                                    f"eval.lm_eval_tasks=[{','.join(names)}]", f"eval.lm_eval_include_path={tasks}",
                                    "eval.lm_eval_limit=2"))))  # fmt: skip
    assert [r["iteration"] for r in read_metrics(tmp_path / "scored") if "lm_eval_seconds" in r] == [2, 4, 6]
    assert train_losses(tmp_path / "scored") == train_losses(tmp_path / "plain")


def test_a_resume_from_an_older_checkpoint_leaves_each_tensorboard_step_once(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """A crash after iteration 6's events were written but before its checkpoint: the resume from
    iteration 3 (with another learning rate, so the values differ) retrains 4-6, and TensorBoard's
    reader shows each step once, with the new values (the writers purge what follows the resume)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = _args(builtin_prefix, tmp_path, "train.train_iters=6", "checkpoint.save_interval=3",
                 f"logging.tensorboard_dir={tmp_path / 'tb'}")  # fmt: skip
    _check(run(launch_cmd(1, *args)))
    first = {r["iteration"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    shutil.rmtree(tmp_path / "checkpoints" / "iter_0000006")
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000003")
    _check(run(launch_cmd(1, *args, "train.lr=1e-3")))
    last = {r["iteration"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}  # later records win
    # iteration 4 runs on the weights of iteration 3 again (the new rate acts from its update on)
    assert all(last[i] != first[i] for i in (5, 6)) and all(last[i] == first[i] for i in (1, 2, 3, 4))
    for directory, tag, step in (
        (tmp_path / "tb", "train/loss", 1),
        (tmp_path / "tb" / "by_tokens", "train/loss vs tokens", 8 * 64),
    ):
        tb = EventAccumulator(str(directory))
        tb.Reload()
        events = tb.Scalars(tag)
        assert [e.step for e in events] == [i * step for i in range(1, 7)], directory
        assert [e.value for e in events] == pytest.approx([last[i] for i in range(1, 7)], rel=1e-6)


def test_zero3_checkpoint_loads_for_evaluation(builtin_prefix: Path, tmp_path: Path) -> None:
    args = _args(
        builtin_prefix, tmp_path, "deepspeed_config=configs/deepspeed/zero3.json", "train.train_iters=3"
    )
    _check(run(launch_cmd(2, *args)))
    text = tmp_path / "held_out.txt"
    text.write_text("The list type is a mutable sequence.\n" * 20)
    p = run(
        [
            "python",
            script("evaluate.py"),
            "--checkpoint",
            str(tmp_path / "checkpoints"),
            "--input",
            str(text),
            "--json",
        ]
    )
    _check(p)
    assert json.loads(p.stdout.strip().splitlines()[-1])["tokens"] > 100


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.num_layer=2"], "unknown config key 'model.num_layer'"),
        (["data.train_data_path=/nonexistent/prefix"], "token file '/nonexistent/prefix.idx' not found"),
        (["train.global_batch_size=7"], "must be a multiple of train.micro_batch_size"),
        (["data.tokenizer=/nonexistent.model"], "does not exist"),
        (["checkpoint.resume=/nonexistent/iter_0000010"], "checkpoint.resume = '/nonexistent/iter_0000010' does not exist"),
    ],
)
def test_user_errors_are_one_clear_line(
    builtin_prefix: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    """Each is found before the model is built (seconds, not a large model's construction)."""
    p = run(["python", script("pretrain.py"), *_args(builtin_prefix, tmp_path), *extra])
    assert p.returncode == 1
    assert message in p.stderr and "Traceback" not in p.stderr
    assert "parameters on this rank" not in p.stdout + p.stderr  # the model line comes after the build


def test_a_missing_token_file_is_found_before_the_model_is_built(builtin_prefix: Path, tmp_path: Path) -> None:
    """The second prefix of a blend is missing: one line naming it, before the model is built (a
    wrong path found in seconds, not after a large model's construction), on both ranks' behalf."""
    blend = f"data.train_data_path=0.5 {builtin_prefix} 0.5 {tmp_path / 'missing'}"
    p = run(launch_cmd(2, *_args(builtin_prefix, tmp_path / "run"), blend))
    assert p.returncode != 0  # (torchrun adds its own report of the failed ranks)
    assert "Traceback" not in p.stderr.split("torch/distributed/elastic")[0], p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: token file '{tmp_path / 'missing'}.idx' not found; create it with "
                      f"scripts/preprocess_data.py --output-prefix {tmp_path / 'missing'}"], errors  # fmt: skip
    assert "parameters on this rank" not in p.stdout + p.stderr  # the model line comes after the build


def test_llama_preset_is_deterministic_for_a_seed_and_profiling_changes_nothing(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """The second run profiles iterations 2-3 (logging.profile_step_start/end): the same losses bit for
    bit, a Chrome trace with the step's named parts, and the per-step table."""
    llama = ["model.architecture=llama", "model.num_query_groups=1", "model.activation_checkpointing=true"]
    profile = ["logging.profile_step_start=2", "logging.profile_step_end=3"]
    curves = []
    for name, extra in (("a", []), ("b", profile)):
        _check(run(["python", script("pretrain.py"), *_args(builtin_prefix, tmp_path / name), *llama, *extra]))
        curves.append(train_losses(tmp_path / name))
    assert curves[0] == curves[1]  # bitwise: same seed, same data, fp32 on CPU
    assert curves[0][-1] < curves[0][0]
    assert not (tmp_path / "a" / "profile").exists()
    trace = json.loads((tmp_path / "b" / "profile" / "trace_rank00000.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"llm/data", "llm/forward", "llm/backward", "llm/optimizer_step"} <= names
    table = (tmp_path / "b" / "profile" / "summary_rank00000.txt").read_text()
    assert table.startswith("one step, mean of 2 (ms)")
    rows = {label: float(value) for label, value in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[2:])}
    assert set(rows) == {"data", "forward", "backward", "optimizer_step", "of which collectives",
                         "outside these parts", "step (wall)"}  # fmt: skip
    parts = rows["data"] + rows["forward"] + rows["backward"] + rows["optimizer_step"]
    assert rows["forward"] > 0 and rows["backward"] > 0 and rows["optimizer_step"] > 0
    assert abs(parts + rows["outside these parts"] - rows["step (wall)"]) < 0.05 * rows["step (wall)"]


def test_non_finite_loss_stops_with_the_iteration(builtin_prefix: Path, tmp_path: Path) -> None:
    p = run(["python", script("pretrain.py"), *_args(builtin_prefix, tmp_path), "train.lr=1e12", "train.min_lr=0",
             "train.clip_grad=0", "train.lr_warmup_iters=0"])  # fmt: skip
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "training diverged" in p.stderr and "at iteration" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("stage, sp", [(1, False), (2, True)])
def test_tp2_dp2_matches_one_process(
    stage: int,
    sp: bool,
    builtin_prefix: Path,
    tmp_path: Path,
    reference_run: Path,
    single_process_losses: list[float],
) -> None:
    """TP=2 x DP=2 (4 processes) through deepspeed: the loss curve of TP=1 x DP=1 at the same global batch."""
    args = _args(builtin_prefix, tmp_path, f"deepspeed_config=configs/deepspeed/zero{stage}.json",
                 "parallel.tensor_model_parallel_size=2", f"model.sequence_parallel={str(sp).lower()}")  # fmt: skip
    _check(run(launch_cmd(4, *args)))
    _assert_same_curve(train_losses(tmp_path), single_process_losses, 1e-4)
    if stage == 1 and not sp:  # a checkpoint written at TP=2 loads for evaluation, as the TP=1 one does
        assert sorted(p.name for p in (tmp_path / "checkpoints" / f"iter_{ITERS:07d}").glob("mp_rank_*")) == [
            "mp_rank_00_model_states.pt",
            "mp_rank_01_model_states.pt",
        ]
        got = _perplexity(tmp_path / "checkpoints", builtin_prefix)
        ref = _perplexity(reference_run / "checkpoints", builtin_prefix)
        assert got["tokens"] == ref["tokens"]
        assert abs(got["loss"] - ref["loss"]) / ref["loss"] < 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ["parallel.pipeline_model_parallel_size=2"]),
        (4, ["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
             "model.sequence_parallel=true", "deepspeed_config=configs/deepspeed/zero1.json"]),
        (4, ["parallel.pipeline_model_parallel_size=2", "deepspeed_config=configs/deepspeed/zero1.json"]),
    ],
    ids=["pp2", "tp2_pp2_sp", "pp2_dp2_zero1"],
)  # fmt: skip
def test_pipeline_layouts_match_one_process(
    nproc: int, extra: list[str], builtin_prefix: Path, tmp_path: Path, reference_run: Path,
    single_process_losses: list[float],
) -> None:  # fmt: skip
    p = run(launch_cmd(nproc, *_args(builtin_prefix, tmp_path, *extra)))
    _check(p)
    # warnings a user cannot act on (torch's about DeepSpeed's pipeline broadcast and its deprecated
    # ZeRO collectives) are filtered at their source
    assert "c10d::broadcast_" not in p.stderr and "is deprecated" not in p.stderr, p.stderr[-3000:]
    _assert_same_curve(train_losses(tmp_path), single_process_losses, 1e-4)
    ref_val = [r["val_loss"] for r in read_metrics(reference_run) if "val_loss" in r]
    _assert_same_curve([r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r], ref_val, 1e-4)
    if nproc == 2:  # a checkpoint written at PP=2 loads for evaluation, as the PP=1 one does
        assert (
            tmp_path / "checkpoints" / f"iter_{ITERS:07d}" / "layer_00-model_00-model_states.pt"
        ).is_file()
        got = _perplexity(tmp_path / "checkpoints", builtin_prefix)
        ref = _perplexity(reference_run / "checkpoints", builtin_prefix)
        assert abs(got["loss"] - ref["loss"]) / ref["loss"] < 1e-4


def test_zero2_with_pipeline_is_refused_in_one_line(builtin_prefix: Path, tmp_path: Path) -> None:
    args = _args(builtin_prefix, tmp_path, "parallel.pipeline_model_parallel_size=2",
                 "deepspeed_config=configs/deepspeed/zero2.json")  # fmt: skip
    p = run(deepspeed_cmd(2, *args))
    assert p.returncode != 0
    assert "incompatible with pipeline parallelism" in p.stderr + p.stdout and "Traceback" not in p.stderr


Z = "deepspeed_config=configs/deepspeed/zero{}.json".format
TP2, PP2 = "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"


@pytest.mark.distributed
@pytest.mark.parametrize(
    "first, second",
    [
        ((2, [TP2]), (1, [])),
        ((2, [PP2]), (2, [])),
        ((2, [Z(1)]), (1, [Z(2)])),
        ((4, [TP2, PP2, Z(1)]), (2, [Z(3)])),
    ],
    ids=["tp2_to_tp1", "pp2_to_pp1_dp2", "dp2_zero1_to_dp1_zero2", "tp2_pp2_zero1_to_dp2_zero3"],
)
def test_resume_at_another_layout_continues_the_curve(
    first: tuple, second: tuple, builtin_prefix: Path, tmp_path: Path, single_process_losses: list[float]
) -> None:
    """Five iterations at one layout, the other five at another: the uninterrupted TP1 curve (1e-4),
    so weights, AdamW moments and step, LR schedule and data position all carried over."""
    (n1, a1), (n2, a2) = first, second
    p = run(launch_cmd(n1, *_args(builtin_prefix, tmp_path, *a1, "train.exit_interval=5")))
    _check(p)
    p = run(launch_cmd(n2, *_args(builtin_prefix, tmp_path, *a2)))
    _check(p)
    assert "resharding model and optimizer state" in p.stdout + p.stderr
    records = read_metrics(tmp_path)
    assert [r["consumed_samples"] for r in records if "loss" in r] == [8 * i for i in range(1, ITERS + 1)]
    _assert_same_curve(train_losses(tmp_path), single_process_losses, 1e-4)
    universal = tmp_path / "checkpoints" / "iter_0000005" / "universal"
    assert (universal / "state.pt").is_file() and (universal / "layers.1.attention.qkv.weight.pt").is_file()


def test_auto_resume_skips_an_interrupted_or_damaged_checkpoint(
    builtin_prefix: Path, tmp_path: Path, single_process_losses: list[float]
) -> None:
    """The on-disk state of a kill during the write of iteration 10 (no MANIFEST, `latest` still on 5,
    a truncated shard), then a damaged file in the checkpoint `latest` names: resume: auto uses the
    newest complete checkpoint, says which file it skipped, and finishes the same curve."""
    args = _args(builtin_prefix, tmp_path, "checkpoint.save_interval=5")
    _check(run(["python", script("pretrain.py"), *args]))
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "iter_0000010" and (
        ckpt / "iter_0000005" / "MANIFEST.json"
    ).is_file()
    model_file = ckpt / "iter_0000010" / "mp_rank_00_model_states.pt"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])  # damaged: half written
    (tmp_path / "metrics.jsonl").write_text("")
    p = run(["python", script("pretrain.py"), *args])
    _check(p)
    assert f"checkpoint file '{model_file}' is damaged" in p.stderr + p.stdout
    assert "iter_0000005 at iteration 5" in p.stdout + p.stderr
    assert train_losses(tmp_path) == single_process_losses[5:]
    # interrupted: the save of iteration 10 never finished (no MANIFEST), `latest` names iteration 5
    (ckpt / "iter_0000010" / "MANIFEST.json").unlink()
    (ckpt / "latest").write_text("iter_0000005")
    (tmp_path / "metrics.jsonl").write_text("")
    p = run(["python", script("pretrain.py"), *args])
    _check(p)
    assert (
        "iter_0000005 at iteration 5" in p.stdout + p.stderr
        and train_losses(tmp_path) == single_process_losses[5:]
    )


def test_an_explicit_damaged_checkpoint_is_one_clear_error(builtin_prefix: Path, tmp_path: Path) -> None:
    args = _args(builtin_prefix, tmp_path, "train.train_iters=2")
    _check(run(["python", script("pretrain.py"), *args]))
    tag = tmp_path / "checkpoints" / "iter_0000002"
    (tag / "mp_rank_00_model_states.pt").unlink()
    p = run(["python", script("pretrain.py"), *args, "train.train_iters=4", f"checkpoint.resume={tag}"])
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"checkpoint file '{tag / 'mp_rank_00_model_states.pt'}' is missing" in p.stderr


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ["deepspeed_config=configs/deepspeed/zero2.json"]),
        (2, ["parallel.tensor_model_parallel_size=2"]),
        (2, ["parallel.pipeline_model_parallel_size=2"]),
    ],
    ids=["dp2_zero2", "tp2", "pp2"],
)
def test_exact_resume_is_bitwise(nproc: int, extra: list[str], builtin_prefix: Path, tmp_path: Path) -> None:
    """Six iterations straight, saving at three; a new run resumed from that checkpoint trains
    iterations four to six with bitwise the same losses and learning rates (dropout on). One process
    is covered by test_auto_resume_skips_an_interrupted_or_damaged_checkpoint (bitwise too)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["train.train_iters=6", "model.dropout=0.1", *extra]
    _check(run(launch_cmd(nproc, *_args(builtin_prefix, straight, *args, "checkpoint.save_interval=3"))))
    ckpt = straight / "checkpoints" / "iter_0000003"
    p = run(launch_cmd(nproc, *_args(builtin_prefix, resumed, *args, f"checkpoint.resume={ckpt}")))
    _check(p)
    assert f"resumed from {ckpt} at iteration 3" in p.stdout + p.stderr
    assert train_losses(resumed) == train_losses(straight)[3:]  # bitwise, dropout and all
    assert [r["lr"] for r in read_metrics(resumed) if "lr" in r] == [
        r["lr"] for r in read_metrics(straight) if "lr" in r
    ][3:]


def test_sigterm_saves_and_exits_zero(builtin_prefix: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    cmd = ["python", script("pretrain.py"), *_args(builtin_prefix, tmp_path, "train.train_iters=100000")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.Popen(cmd, cwd=Path(script("pretrain.py")).parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    last = [r["iteration"] for r in read_metrics(tmp_path) if "loss" in r][-1]
    assert f"stopped at iteration {last} (SIGTERM)" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"iter_{last:07d}"


def test_resumed_run_continues_the_same_wandb_run(builtin_prefix: Path, tmp_path: Path) -> None:
    args = _args(builtin_prefix, tmp_path, "logging.wandb_mode=offline", "train.exit_interval=5")
    env = {"WANDB_SILENT": "true"}
    first = run(["python", script("pretrain.py"), *args], env=env)
    _check(first)
    assert "stopped at iteration 5 (train.exit_interval=5)" in first.stdout  # a planned stop, LR untouched
    _check(run(["python", script("pretrain.py"), *args], env=env))
    ckpt = tmp_path / "checkpoints"
    first = json.loads((ckpt / "iter_0000005" / "llm_meta.json").read_text())["wandb_run_id"]
    second = json.loads((ckpt / "iter_0000010" / "llm_meta.json").read_text())["wandb_run_id"]
    assert first and first == second
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{first}") for name in runs), runs


@pytest.mark.distributed
def test_evaluate_on_two_processes_matches_one(builtin_prefix: Path, reference_run: Path) -> None:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           script("evaluate.py"), "--checkpoint", str(reference_run / "checkpoints"), "--data",
           str(builtin_prefix), "--split", "valid", "--json"]  # fmt: skip
    p = run(cmd)
    _check(p)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    ref = _perplexity(reference_run / "checkpoints", builtin_prefix)
    assert got["tokens"] == ref["tokens"] and abs(got["loss"] - ref["loss"]) / ref["loss"] < 1e-6


def test_sigkill_at_any_moment_leaves_a_resumable_checkpoint(builtin_prefix: Path, tmp_path: Path) -> None:
    """A real kill -9 while saving every iteration (a model big enough that writes take a while):
    `latest` always names a complete checkpoint, and the run resumes from it."""
    import os
    import signal
    import subprocess
    import time

    big = [
        "model.hidden_size=256",
        "model.num_layers=4",
        "checkpoint.save_interval=1",
        "train.train_iters=40",
    ]
    args = _args(builtin_prefix, tmp_path, *big)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.Popen(["python", script("pretrain.py"), *args], cwd=Path(script("pretrain.py")).parents[1],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = tmp_path / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(ckpt.glob("iter_*"))) < 3:
        time.sleep(0.05)
    time.sleep(0.15)  # somewhere inside a step or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    from llm.checkpoint.format import verify_checkpoint

    latest = ckpt / (ckpt / "latest").read_text().strip()
    verify_checkpoint(latest)  # complete, whatever the moment of the kill
    p = run(["python", script("pretrain.py"), *_args(builtin_prefix, tmp_path, *big, "train.train_iters=" +
                                                     str(int(latest.name[5:]) + 1))])  # fmt: skip
    _check(p)
    assert f"resumed from {latest}" in p.stdout + p.stderr


def test_a_compiler_failure_under_model_compile_is_one_clear_error(builtin_prefix: Path, tmp_path: Path) -> None:
    """model.compile on a machine whose C++ compiler does not work (inductor's CPU code is C++; `CXX`
    names the compiler it uses): one line naming the failure and model.compile=false, exit 1, and the
    compiler's long output in a file of the run instead of the console."""
    p = run(["python", script("pretrain.py"), *_args(builtin_prefix, tmp_path, "train.train_iters=2",
                                                      "model.compile=true")], env={"CXX": "/bin/false"})  # fmt: skip
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "torch.compile failed" in errors[0] and "InvalidCxxCompiler" in errors[0]
    assert "Set model.compile=false" in errors[0]
    output = tmp_path / "compile_error_rank00000.txt"
    assert f"The compiler's output: {output}" in errors[0]
    assert "Traceback" in output.read_text() and "InvalidCxxCompiler" in output.read_text()
