"""Every benchmark script runs, in its seconds-long --smoke mode, so none can rot unnoticed.

Speed and memory are not asserted here (they are measured by the full runs and written down in
docs/benchmarks.md); a smoke run must finish and report sensible, positive measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, benchmark_module, check, run

pytestmark = [pytest.mark.integration]

HELPERS = {"common.py", "pretrain_measured.py"}  # imported or launched by the benchmarks themselves
BENCHMARKS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name not in HELPERS)


def _report(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_every_benchmark_script_is_smoke_tested() -> None:
    assert BENCHMARKS == [
        "checkpoint_io.py", "context_parallel.py", "data_startup.py", "diloco.py", "engine_syncs.py", "framework_overhead.py", "loss_memory.py", "model_throughput.py", "moe.py", "plan_memory.py", "preprocess_throughput.py",
        "recipes.py", "sample_read.py", "tp_comm.py",
    ]  # fmt: skip


SMOKE_DATA = {"framework_overhead.py", "checkpoint_io.py", "diloco.py", "recipes.py", "plan_memory.py"}  # need --data


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke(name: str, builtin_prefix: Path, tmp_path: Path) -> None:
    """The benchmark's --smoke run (each on its own: pytest's workers run two tests at a time)."""
    extra = ["--data", str(builtin_prefix)] if name in SMOKE_DATA else []
    if name == "plan_memory.py":
        extra += ["--out", str(tmp_path)]
    p = run(["python", str(REPO / "benchmarks" / name), "--smoke", *extra], timeout=300)
    check(p)
    if name == "plan_memory.py":
        row = next(line for line in p.stdout.splitlines() if line.startswith("z0_dp1"))
        measured, estimate = (float(x) for x in row.split()[-3:-1])
        assert measured > 0 and estimate > 0, row
        return
    report = _report(p.stdout)
    assert report["benchmark"] == name.removesuffix(".py")
    if name == "checkpoint_io.py":
        assert report["hashing"]["xxh3_page_cache_gb_per_s"] > 0
        assert report["tiny_cpu_saves"]["save_seconds"] > report["tiny_cpu_saves"]["checksum_seconds"] > 0
        return
    if name == "data_startup.py":
        assert report["blend_100000"]["build_s"] > 0 and report["python_loop_us_per_sample"] > 0
        assert report["build_datasets_cold_s"] > report["build_datasets_warm_s"] > 0
        assert report["pretrain_to_first_step_cold_s"] > 0 and report["documents"] > 0
        return
    if name == "diloco.py":  # bytes counted from the collectives; the islands' agree with what they report
        sync, islands = report["runs"]["sync_dp"], report["runs"]["diloco_h8_int4"]
        assert sync["bytes_per_token"] > islands["bytes_per_token"] > 0 and islands["val_loss"] > 0
        assert islands["bytes_by_collective"]["all_gather"] >= islands["diloco_bytes_reported_per_rank"] > 0
        return
    if name == "context_parallel.py":  # bytes counted from the real sends; C = 2 keeps about half per rank
        one, two = report["c1"], report["c2_p2p"]
        assert two["forward_sent_per_layer"] == two["forward_formula_per_layer"] > 0
        assert 0 < two["activation_bytes"] < one["activation_bytes"] and report["c2_a2a"]["backward_sent_per_layer"] > 0
        return
    if name == "engine_syncs.py":  # counted calls: the loss read (llm's) and DeepSpeed's BF16_Optimizer's checks
        smoke = report["bf16_zero1_fp32_grads"]
        assert smoke["optimizer_wrapper"] == "BF16_Optimizer" and smoke["syncs_per_step"] >= 1
        return
    if name == "loss_memory.py":  # measured peaks; the chunked loss equals the whole-logits loss
        whole, chunked = report["whole_logits"], report["chunks_1024"]
        assert 0 < chunked["peak_bytes_over_inputs"] < whole["peak_bytes_over_inputs"]
        assert abs(chunked["loss_minus_whole"]) < 1e-5 and whole["loss"] > 0
        return
    if name == "moe.py":  # bytes counted from the real all-to-alls; backward repeats forward's exchange
        a2a, step = report["all_to_all_ep2"], report["step_ep1"]
        assert a2a["forward_and_backward_bytes_per_token"] == 2 * a2a["forward_bytes_per_token"] > 0
        assert 0.5 < a2a["forward_over_formula"] < 1.5 and a2a["count_exchange_bytes_forward"] > 0
        assert step["dense_step_s"] > 0 and step["moe_step_s"] > 0 and step["moe_params"] > step["moe_active_params"]
        return
    if name == "recipes.py":  # every run reached its end, the cool-downs at min_lr's side of the schedule
        runs = report["runs"]
        assert set(runs) == {"adamw_cosine", "adamw_wsd", "muon_wsd"}
        assert all(r["val_loss"] > 0 and r["step_time_s"] > 0 for r in runs.values())
        assert runs["adamw_wsd"]["final_lr"] == runs["muon_wsd"]["final_lr"] < 2e-3
        return
    positive = {
        "framework_overhead.py": ["pretrain_py_step_seconds", "bare_loop_step_seconds"],
        "model_throughput.py": ["matmul_peak_gflops"],
        "preprocess_throughput.py": ["raw_encode_tokens_per_sec"],
        "sample_read.py": ["bin_bytes", "samples", "us_per_sample_warm"],
        "tp_comm.py": ["analytic_bytes_with_embedding_and_loss"],
    }[name]
    for key in positive:
        assert report[key] > 0, (key, report)
    if name == "model_throughput.py":  # every model of every shape was timed (their losses agreed first)
        for shape in ("gpt2:1:64:2:32:2", "llama:1:64:4:32:2"):
            assert (
                all(v > 0 for v in report[shape]["tokens_per_sec"].values())
                and report[shape]["ours_over_plain"] > 0
            )
    if name == "tp_comm.py":  # bytes are counted from real collectives: the TP run moves some
        assert (
            report["tp2"]["total_bytes"]
            > report["tp2_sequence_parallel_parallel_block"]["bytes_per_layer"]
            > 0
        )


def test_the_planner_memory_estimate_is_within_15_percent_of_measured(
    builtin_prefix: Path, tmp_path: Path
) -> None:
    """The planner's memory model against real runs at the benchmark's shape (16.5M parameters, fp32):
    the two cases furthest from 1.0 in docs/benchmarks.md (a pipeline stage split by DeepSpeed's
    partitioner; TP 2 with sequence parallelism and ZeRO 1). The smoke shape is too small to say
    anything (fixed costs dominate), so this runs the real one (about 40 s)."""
    p = run(["python", str(REPO / "benchmarks" / "plan_memory.py"), "--data", str(builtin_prefix), "--out",
             str(tmp_path), "--only", "pp2,tp2_sp_z1"], timeout=500)  # fmt: skip
    check(p)
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith(("pp2 ", "tp2_sp_z1 "))]
    assert len(rows) == 2, p.stdout
    for row in rows:
        measured, estimate, ratio = (float(x) for x in row[-3:])
        assert measured > 0.1 and abs(ratio - 1) <= 0.15, row


def test_framework_overhead_for_one_config(builtin_prefix: Path) -> None:
    """The comparison `--device cuda` runs on a GPU (pretrain.py as configured against the bare loop),
    here on the CPU for the quickstart config at the smoke shape."""
    p = run(["python", str(REPO / "benchmarks" / "framework_overhead.py"), "--smoke", "--data", str(builtin_prefix),
             "--config", "configs/tiny_cpu.yaml"], timeout=300)  # fmt: skip
    check(p)
    report = _report(p.stdout)
    assert report["benchmark"] == "framework_overhead_cpu" and report["config"] == "configs/tiny_cpu.yaml"
    assert report["pretrain_py_step_seconds"] > 0 and report["bare_loop_step_seconds"] > 0


def test_the_gpu_check_parts_are_complete_and_an_unknown_part_is_refused() -> None:
    """benchmarks/gpu_check.sh (one device call, parts within a budget): every part in its order has an
    estimate and a function, and PARTS naming no part stops before anything runs."""
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    order = text[text.index("ALL=(") + 5 : text.index(")", text.index("ALL=("))].split()
    estimates = dict(
        (k, int(v)) for k, v in (x.strip("[").split("]=") for x in text[text.index("EST=(") + 5 :].split(")")[0].split())
    )
    assert len(order) == len(set(order)) == 21 and set(order) == set(estimates)
    assert all(f"part_{name}()" in text for name in order)
    p = run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "/nonexistent/out"], timeout=30,
            env={"PARTS": "llama_1b,no_such_part"})  # fmt: skip
    assert p.returncode == 2 and "unknown part 'no_such_part'" in p.stderr and "cuda_tests" in p.stderr, p.stderr
    assert not Path("/nonexistent/out").exists()


def test_checkpoint_io_counts_every_step_a_background_write_overlapped() -> None:
    """Which steps ran during a background write, from the metrics log's order alone: a write found
    finished at a step boundary is logged before that step's record; one the next save waited for,
    after the last step's record and before that save's blocking time (the count once stopped one
    step into such a write, leaving out most of its steps)."""
    module = benchmark_module("checkpoint_io.py")

    def step(i: int) -> dict:
        return {"iteration": i, "step_time": 0.5}

    def block(i: int) -> dict:
        return {"iteration": i, "checkpoint_block_seconds": 0.01}

    def written(i: int) -> dict:
        return {"iteration": i, "checkpoint_write_seconds": 3.0}

    records = [step(1), step(2), block(2), step(3), written(2), step(4), step(5), step(6),  # found at 4's boundary
               block(6), step(7), step(8), step(9), step(10), written(6), block(10),  # the save at 10 waited
               step(11), step(12), {"iteration": 12, "val_loss": 7.0}, written(10), block(12), written(12)]  # fmt: skip
    assert module._steps_during_writes(records) == {2: {3, 4}, 6: {7, 8, 9, 10}, 10: {11, 12}, 12: set()}
