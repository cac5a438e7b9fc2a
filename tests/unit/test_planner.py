"""The layout planner: parameter counts and activation bytes against the real model, cluster configs,
recommendations that fit, and scripts/plan.py. Measured peaks: benchmarks/plan_memory.py (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from llm.config import load_config, validate_world
from llm.engine.deepspeed_config import build_deepspeed_config
from llm.model.flops import total_params
from llm.model.gpt import build_model, count_parameters
from llm.parallel.layers import use_fp8
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker
from llm.planner.memory import GB, Layout, layer_activation_bytes
from llm.planner.report import config_layout, config_vocab
from llm.planner.search import Cluster, evaluate_layout, plan
from tests.conftest import REPO

SMALL = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.seq_length=64",
         "model.vocab_size=1000"]  # fmt: skip
CLUSTER_CONFIGS = {  # config -> (nodes, GPUs per node) it is written for
    "gpt_1.3b_1x8": (1, 8),
    "gpt_6.7b_2x8": (2, 8),
    "gpt_13b_tp4_pp2": (2, 8),
    "llama_70b_tp8_pp8": (16, 8),
}


def _model(overrides: list[str]) -> tuple:
    cfg = load_config("configs/tiny_cpu.yaml", SMALL + overrides)
    rng = RNGTracker()
    rng.seed(seed=1, tp_rank=0, pp_rank=0, device="cpu")
    return cfg, build_model(cfg.model, seed=1, ctx=ParallelContext.single(), rng=rng)


MOE = ["model.num_experts=8", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=96"]
MODELS = {
    "gpt2": ["model.architecture=gpt2"],
    "llama_gqa": ["model.architecture=llama", "model.num_query_groups=2"],
    "gpt2_moe": ["model.architecture=gpt2", *MOE],
    "llama_moe_shared": ["model.architecture=llama", "model.num_query_groups=2", *MOE,
                         "model.moe_shared_expert_intermediate_size=64"],
}  # fmt: skip


@pytest.mark.parametrize("overrides", list(MODELS.values()), ids=list(MODELS))
def test_parameter_count_is_the_models(overrides: list[str]) -> None:
    cfg, model = _model(overrides)
    assert total_params(cfg.model, 1000) == count_parameters(model)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("overrides", list(MODELS.values()), ids=list(MODELS))
def test_activation_bytes_are_what_autograd_keeps(overrides: list[str], precision: str) -> None:
    """Every distinct storage autograd saves in one block's forward (parameters excluded), counted
    with saved-tensor hooks, against the planner's per-layer formula (SDPA on CPU): fp32, bf16 (the
    model in bf16, as DeepSpeed's bf16 engine holds it) and fp8 (bf16 with the block's linear layers
    in float8, which keep float8 copies of their inputs and weights). The block is a real one, so a
    change to llm's layers that keeps more tensors fails here. An MoE block routes dropless, so the
    token copies (k per token) do not depend on the routing."""
    cfg, model = _model(overrides)
    if precision != "fp32":
        model = model.to(torch.bfloat16)
    if precision == "fp8":
        assert use_fp8(model, ParallelContext.single()) == []
    measured = block_saved_bytes(model, cfg, batch=2)
    layout = Layout(tp=1, pp=1, dp=1, zero=0, micro_batch_size=2)
    estimate = layer_activation_bytes(cfg.model, layout, precision, cfg.model.seq_length)
    # exact but for an MoE layer's 32-byte routing statistic
    assert abs(estimate - measured) <= 32, (estimate, measured)


def block_saved_bytes(model: torch.nn.Module, cfg: Any, *, batch: int) -> int:
    """The bytes of every distinct storage autograd saves in the forward of `model`'s first block
    (on the model's device and in its dtype), parameters and the shared rotary tables left out."""
    block = model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
    x = torch.randn(batch, cfg.model.seq_length, cfg.model.hidden_size, dtype=dtype, device=device,
                    requires_grad=True)  # fmt: skip
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    # the cos/sin tables are buffers, shared by all layers
    rotary_tables = 2 * cfg.model.seq_length * cfg.model.head_dim * dtype.itemsize if cfg.model.is_llama else 0
    return sum(saved.values()) - rotary_tables


def test_recommendation_for_a_model_too_big_for_one_gpu_fits() -> None:
    cfg = load_config("configs/llama_7b.yaml")
    vocab = config_vocab(cfg)
    one = plan(cfg, Cluster(1, 1), precision="bf16", vocab=vocab)
    assert one and not any(c.fits for c in one)  # 7B with AdamW needs > 80 GB on one device
    cands = plan(cfg, Cluster(1, 8), precision="bf16", vocab=vocab)
    pick = cands[0]
    assert pick.fits and pick.memory.total <= 0.9 * 80 * GB
    lay = pick.layout
    chosen = load_config("configs/llama_7b.yaml", [
        f"parallel.tensor_model_parallel_size={lay.tp}", f"parallel.pipeline_model_parallel_size={lay.pp}",
        f"train.micro_batch_size={lay.micro_batch_size}", f"model.sequence_parallel={str(lay.sequence_parallel).lower()}",
        f"model.activation_checkpointing={str(lay.activation_checkpointing).lower()}",
        f"deepspeed_config=configs/deepspeed/zero{lay.zero}.json",
    ])  # fmt: skip
    build_deepspeed_config(chosen, 8, cuda=True)  # a layout llm accepts: no ConfigError
    # bigger sequences need more: a layout that does not fit is never ranked above one that does
    assert all(a.fits or not b.fits for a, b in zip(cands, cands[1:]))


def test_the_planner_counts_experts_per_expert_parallel_rank_and_chooses_ep() -> None:
    """Memory: the routed experts of one EP rank, partitioned over DP / EP; the planner weighs every EP
    that divides DP and the experts, and llm accepts its pick and its best layout with EP > 1."""
    from llm.model.flops import expert_layer_params, pipeline_layer_params
    from llm.planner.memory import estimate_memory

    cfg = load_config("configs/moe_fine_grained_a2b.yaml", ["model.vocab_size=32000"])
    m = cfg.model
    one, two = (estimate_memory(m, Layout(1, 1, 8, 1, 1, ep=ep), precision="bf16", vocab=32000,
                                global_batch_size=1024) for ep in (1, 2))  # fmt: skip
    routed = sum(expert_layer_params(m, ep=1))
    assert one.params == sum(pipeline_layer_params(m, 1, 32000)) and one.params - two.params == routed // 2
    # ZeRO 1: fp32 master and moments (12 bytes) of dense parameters over DP, of routed experts over DP / EP
    dense = one.params - routed
    assert two.optimizer == pytest.approx(12 * dense / 8 + 12 * (routed // 2) / 4)
    cands = plan(cfg, Cluster(1, 8), precision="bf16", vocab=32000)
    assert cands[0].fits
    best_ep = next(c for c in cands if c.layout.ep > 1)
    assert best_ep.fits and m.num_experts % best_ep.layout.ep == 0
    for lay in (cands[0].layout, best_ep.layout):  # layouts llm accepts: no ConfigError
        chosen = load_config("configs/moe_fine_grained_a2b.yaml", [
            "model.vocab_size=32000", f"parallel.expert_model_parallel_size={lay.ep}",
            f"parallel.tensor_model_parallel_size={lay.tp}", f"parallel.pipeline_model_parallel_size={lay.pp}",
            f"train.micro_batch_size={lay.micro_batch_size}", f"deepspeed_config=configs/deepspeed/zero{lay.zero}.json",
        ])  # fmt: skip
        validate_world(chosen, 8)  # the config check, fp8's included (the device check needs a GPU)
    assert {c.layout.ep for c in cands} == {1, 2, 4, 8}


@pytest.mark.parametrize("name", sorted(CLUSTER_CONFIGS))
def test_cluster_configs_validate_and_fit_their_cluster(name: str) -> None:
    nodes, gpus = CLUSTER_CONFIGS[name]
    cfg = load_config(REPO / "configs" / "cluster" / f"{name}.yaml")
    world = nodes * gpus
    validate_world(cfg, world)
    ds = build_deepspeed_config(cfg, world, cuda=True)
    assert ds["train_batch_size"] == cfg.train.global_batch_size and ds["bf16"]["enabled"]
    cand = evaluate_layout(
        cfg, config_layout(cfg, world), Cluster(nodes, gpus), precision="bf16", vocab=config_vocab(cfg)
    )
    assert cand.fits, f"{name}: {cand.memory.total / GB:.1f} GiB per GPU"
    assert cand.bubble < 0.05


def test_plan_script_recommends_and_explains_failures() -> None:
    def plan_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "scripts/plan.py", *args], cwd=REPO, capture_output=True, text=True
        )

    p = plan_cli(
        "--config", "configs/cluster/gpt_6.7b_2x8.yaml", "--nodes", "2", "--gpus-per-node", "8", "--top", "3"
    )
    assert p.returncode == 0, p.stderr
    assert "recommended: TP" in p.stdout and "deepspeed_config=configs/deepspeed/zero" in p.stdout
    p = plan_cli("--config", "configs/llama_7b.yaml", "--nodes", "1", "--gpus-per-node", "1", "--json")
    rows = json.loads(p.stdout)
    assert rows and not rows[0]["fits"] and {"memory_gb", "bubble", "step_tflops"} <= set(rows[0])
    p = plan_cli("--config", "configs/llama_7b.yaml", "--nodes", "1", "--gpus-per-node", "1")
    assert p.returncode == 1 and "nothing fits 80 GiB per GPU" in p.stdout
    p = plan_cli("--config", "configs/tiny_cpu.yaml", "--nodes", "1", "--gpus-per-node", "1")  # the config's fp32
    assert p.returncode == 0 and p.stdout.splitlines()[0].endswith("; fp32"), p.stdout
    p = plan_cli("--config", "configs/gpt2_1.3b.yaml", "--nodes", "1", "--gpus-per-node", "8", "--precision", "fp8")
    assert p.returncode == 0 and p.stdout.splitlines()[0].endswith("; fp8"), p.stdout
    p = plan_cli("--config", "configs/llama_7b.yaml", "model.num_layer=3")
    assert (
        p.returncode == 1 and p.stderr.startswith("error: unknown config key") and "Traceback" not in p.stderr
    )


def test_the_planner_divides_activations_by_cp_and_chooses_it_for_a_long_sequence() -> None:
    from llm.planner.memory import estimate_memory

    cfg = load_config("configs/llama_1b_32k.yaml", ["model.vocab_size=32000", "model.seq_length=131072"])
    one, two = (estimate_memory(cfg.model, Layout(1, 1, 8 // cp, 1, 1, cp=cp), precision="bf16", vocab=32000,
                                global_batch_size=64) for cp in (1, 2))  # fmt: skip
    assert two.activations == pytest.approx(one.activations / 2, rel=1e-6)
    assert two.optimizer == pytest.approx(one.optimizer)  # ZeRO shards over DP x CP: the same 8 ranks
    cands = plan(cfg, Cluster(1, 8), precision="bf16", vocab=32000)
    assert not any(c.fits for c in cands if c.layout.cp == 1 and c.layout.tp == 1 and c.layout.pp == 1)
    pick = cands[0]
    assert pick.fits and pick.layout.cp > 1
    chosen = load_config("configs/llama_1b_32k.yaml", [
        "model.vocab_size=32000", "model.seq_length=131072", f"parallel.context_parallel_size={pick.layout.cp}",
        f"parallel.tensor_model_parallel_size={pick.layout.tp}", f"parallel.pipeline_model_parallel_size={pick.layout.pp}",
        f"model.activation_checkpointing={str(pick.layout.activation_checkpointing).lower()}",
        f"deepspeed_config=configs/deepspeed/zero{pick.layout.zero}.json",
    ])  # fmt: skip
    build_deepspeed_config(chosen, 8, cuda=True)  # a layout llm accepts


def test_the_planner_runs_bf16_pipelines_at_zero1_also_at_one_data_parallel_rank() -> None:
    """bf16 with PP at ZeRO 0 is refused (config check): the candidates are ZeRO 1 there, fp32 keeps ZeRO 0."""
    from llm.planner.search import candidate_layouts

    cfg = load_config("configs/gpt2_1.3b.yaml", [])
    cluster = Cluster(1, 8)
    bf16 = [lay for lay in candidate_layouts(cfg, cluster) if lay.pp > 1]
    assert bf16 and {lay.zero for lay in bf16} == {1}
    assert any(lay.dp == 1 and lay.cp == 1 for lay in bf16)
    fp32 = [lay for lay in candidate_layouts(cfg, cluster, precision="fp32") if lay.pp > 1]
    assert 0 in {lay.zero for lay in fp32}


def test_fp8_plans_the_bf16_engine_state_with_its_own_activations() -> None:
    """fp8 runs DeepSpeed's bf16 engine (the same weights, gradients and optimizer state); its
    activations are its own (float8 copies of the linear layers' inputs and weights, and the MLP's
    projection keeps its input where bf16 recomputes it), by the per-layer formula the saved-tensor
    test checks."""
    from llm.planner.memory import estimate_memory

    cfg = load_config("configs/llama_1b.yaml", ["model.vocab_size=32000"])
    layout = Layout(tp=2, pp=1, dp=4, zero=1, micro_batch_size=2, sequence_parallel=True)
    bf16, fp8 = (estimate_memory(cfg.model, layout, precision=p, vocab=32000, global_batch_size=64)
                 for p in ("bf16", "fp8"))  # fmt: skip
    assert (fp8.weights, fp8.gradients, fp8.optimizer) == (bf16.weights, bf16.gradients, bf16.optimizer)
    assert fp8.activations != bf16.activations and 0.75 < fp8.activations / bf16.activations < 1.25


def test_the_planner_assumes_the_zero_buffers_of_the_json_it_recommends() -> None:
    """A recommendation names configs/deepspeed/zero{N}.json; the planner counts that file's buffers
    (overlap_comm at ZeRO 2 and 3: a second reduction bucket at ZeRO 2)."""
    from llm.planner.memory import ZeroBuffers
    from llm.planner.search import shipped_zero_buffers

    for stage in range(4):
        zero = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())["zero_optimization"]
        assert ZeroBuffers.from_json(zero) == shipped_zero_buffers(stage), stage


def test_fp8_candidates_are_layouts_pretrain_accepts_in_fp8() -> None:
    """fp8 needs whole KV groups per TP rank, 16-divisible linear shards and 16-divisible tokens per
    micro-batch on a rank: the planner leaves out what the config check or the layers would refuse."""
    from llm.planner.search import candidate_layouts

    cfg = load_config("configs/llama_1b.yaml", ["model.num_query_groups=4", "model.seq_length=1032"])
    cluster = Cluster(1, 8)
    bf16, fp8 = (candidate_layouts(cfg, cluster, precision=p) for p in ("bf16", "fp8"))
    assert {lay.tp for lay in bf16} == {1, 2, 4, 8} and {lay.tp for lay in fp8} == {1, 2, 4}
    assert {lay.micro_batch_size for lay in bf16 if lay.cp == 1} > {lay.micro_batch_size for lay in fp8 if lay.cp == 1}
    assert all(lay.micro_batch_size * 1032 // lay.cp % 16 == 0 for lay in fp8) and fp8
    for lay in fp8[:: max(1, len(fp8) // 12)]:  # a spread of them through the config check
        chosen = load_config("configs/llama_1b.yaml", [
            "model.num_query_groups=4", "model.seq_length=1032", "train.precision=fp8",
            f"parallel.tensor_model_parallel_size={lay.tp}", f"parallel.pipeline_model_parallel_size={lay.pp}",
            f"parallel.context_parallel_size={lay.cp}", f"train.micro_batch_size={lay.micro_batch_size}",
            f"deepspeed_config=configs/deepspeed/zero{lay.zero}.json",
        ])  # fmt: skip
        validate_world(chosen, 8)  # the config check, fp8's included (the device check needs a GPU)


def test_fp8_candidates_need_16_divisible_experts() -> None:
    """The routed experts run in FP8 too, whole on every TP rank: an expert width FP8 GEMMs cannot take
    leaves no fp8 layout at any TP size (pretrain.py would refuse each), a 16-divisible one leaves some."""
    from llm.planner.search import candidate_layouts

    for width, any_fp8 in ((1400, False), (1408, True)):
        cfg = load_config("configs/moe_fine_grained_a2b.yaml", [f"model.moe_ffn_hidden_size={width}"])
        assert candidate_layouts(cfg, Cluster(1, 8), precision="bf16")
        assert bool(candidate_layouts(cfg, Cluster(1, 8), precision="fp8")) is any_fp8, width


def test_a_mixture_of_experts_in_bf16_plans_on_one_gpu_at_zero_1() -> None:
    """An MoE in bf16 needs ZeRO 1 or 2 (validation), also at one data-parallel rank: the planner
    offers ZeRO 1 there (it had no layout at all for one GPU), and llm accepts it."""
    from llm.planner.search import candidate_layouts

    overrides = ["model.num_layers=4", "model.moe_layer_freq=[0, 1, 1, 1]", "parallel.expert_model_parallel_size=1",
                 "train.global_batch_size=8", "model.vocab_size=8192"]  # fmt: skip
    cfg = load_config("configs/moe_fine_grained_a2b.yaml", overrides)
    for precision in ("bf16", "fp8"):
        layouts = candidate_layouts(cfg, Cluster(1, 1), precision=precision)
        assert layouts and {lay.zero for lay in layouts} == {1}, precision
    chosen = load_config("configs/moe_fine_grained_a2b.yaml", [*overrides, "deepspeed_config=configs/deepspeed/zero1.json"])
    build_deepspeed_config(chosen, 1, cuda=True)


@pytest.mark.parametrize("overrides", list(MODELS.values()), ids=list(MODELS))
def test_fp8_flops_are_those_of_the_layers_use_fp8_switches(overrides: list[str]) -> None:
    """The FLOPs fp8 runs in float8, counted from the real model: 6 per weight of every layer use_fp8
    switches, 4 per routed expert weight a token uses (top-k of the experts; bf16 weight gradient)."""
    from llm.model.flops import fp8_flops_per_token
    from llm.parallel.experts import ExpertLinear

    cfg, model = _model(overrides)
    assert use_fp8(model, ParallelContext.single()) == []
    expected = 0.0
    for module in model.modules():
        if isinstance(module, ExpertLinear):
            expected += 4.0 * module.weight.numel() * cfg.model.moe_router_topk / cfg.model.num_experts
        elif getattr(module, "fp8", None) is not None:
            expected += 6.0 * module.weight.numel()
    assert expected > 0 and fp8_flops_per_token(cfg.model) == expected


def test_fp8_step_time_speeds_up_the_float8_share_of_the_flops() -> None:
    """On one GPU (no communication) an fp8 step is the bf16 step with the float8 GEMMs' share of the
    FLOPs divided by the cluster's fp8_gemm_speedup; a speed-up of 1 changes nothing."""
    import dataclasses

    from llm.model.flops import fp8_flops_per_token, model_flops_per_token

    cfg = load_config("configs/llama_1b.yaml", ["model.vocab_size=32000"])
    layout = Layout(tp=1, pp=1, dp=1, zero=1, micro_batch_size=1)
    share = fp8_flops_per_token(cfg.model) / model_flops_per_token(dataclasses.replace(cfg.model, vocab_size=32000))
    assert 0.5 < share < 0.95  # the LM head and attention scores stay in bf16
    bf16 = evaluate_layout(cfg, layout, Cluster(1, 1), precision="bf16", vocab=32000).step_time
    for speedup in (1.0, 1.3, 2.0):
        fp8 = evaluate_layout(cfg, layout, Cluster(1, 1, fp8_gemm_speedup=speedup), precision="fp8", vocab=32000)
        assert fp8.step_time == pytest.approx(bf16 * (1 - share + share / speedup), rel=1e-12), speedup
