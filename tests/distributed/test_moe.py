"""Expert parallelism 2 (2 gloo processes, DeepSpeed's engine at ZeRO 0, 1 and 2) against one process
holding every expert, on the same weights and data: the loss of every step, the clipped gradient
norm, the weights after the steps (which carry the gradients, the clipping and AdamW), the MoE
statistics, and the full weights merged from the checkpoint the EP run saves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from llm.config import load_config
from llm.model.gpt import build_model, parameter_groups
from llm.model.inputs import model_inputs
from llm.model.moe import moe_metrics, update_expert_bias
from llm.parallel.layers import use_fp8
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker
from tests.distributed.harness import spawn

pytestmark = pytest.mark.distributed
VOCAB, STEPS = 300, 3
OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    f"model.vocab_size={VOCAB}", "model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=16",
    "model.moe_z_loss_coeff=1e-3", "model.moe_aux_loss_coeff=1e-2", "parallel.expert_model_parallel_size=2",
    "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-3", "train.lr_warmup_iters=0",
    "train.lr_decay_style=constant", "train.clip_grad=0.05", "train.precision=fp32",
]  # fmt: skip
CASES = {
    "gpt2": ["model.architecture=gpt2"],  # GELU experts with biases
    "llama_shared": ["model.architecture=llama", "model.moe_shared_expert_intermediate_size=24",
                     "model.moe_router_load_balancing_type=seq_aux_loss", "model.moe_router_score_function=sigmoid",
                     "model.moe_router_enable_expert_bias=true", "model.moe_router_bias_update_rate=0.01"],
    "capacity": ["model.architecture=llama", "model.moe_expert_capacity_factor=1.0", "model.moe_layer_freq=[0, 1]"],
    "llama_sp": ["model.architecture=llama", "model.sequence_parallel=true", "model.moe_router_load_balancing_type=seq_aux_loss",
                 "model.moe_shared_expert_intermediate_size=24"],
    # train.precision: fp8's matmuls (fp32 around them, so that only float8 differs): the block's linear
    # layers and the shared experts per tensor, the routed experts per row
    "llama_fp8": ["model.architecture=llama", "model.moe_shared_expert_intermediate_size=32"],
}  # fmt: skip


def _gathered(p: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The full tensor of a tensor-parallel shard (itself when not split)."""
    from llm.parallel.layers import merge_by_spec, partition_info

    spec = partition_info(p)
    if spec is None:
        return p.detach()
    parts = [torch.empty_like(p) for _ in range(ctx.tp)]
    torch.distributed.all_gather(parts, p.detach().contiguous(), group=ctx.groups["tp"])
    return merge_by_spec(parts, spec)


def _run(rank: int, world: int, zero: int, case: str, save_dir: Path | None, tp: int = 1) -> None:
    from llm.checkpoint.engine import save_checkpoint
    from llm.checkpoint.merge import load_model_state
    from llm.engine.build import initialize_engine
    from llm.engine.deepspeed_config import deepspeed_setup
    from llm.engine.experts import register_experts
    from llm.engine.mpu import MeshMPU
    from llm.training.lr_schedule import make_scheduler
    from llm.training.optim import clipped_optimizer
    from llm.training.steps import make_steps

    extra = [f"checkpoint.dir={save_dir}"] if save_dir else []
    ep = 2 if world // tp >= 2 else 1
    cfg = load_config(None, [*OVERRIDES, *CASES[case], f"deepspeed_config=configs/deepspeed/zero{zero}.json", *extra,
                             f"parallel.tensor_model_parallel_size={tp}", f"parallel.expert_model_parallel_size={ep}"])
    ctx = ParallelContext.build(tp=tp, ep=ep)
    dp = ctx.dp
    ds, plan = deepspeed_setup(cfg, world, cuda=False)
    rng = RNGTracker()
    model = build_model(cfg.model, seed=cfg.train.seed, ctx=ctx, rng=rng)
    if case.endswith("fp8"):
        assert use_fp8(model, ctx) == [] and all(m.fp8 for m in model.modules() if type(m).__name__ == "ExpertLinear")
    groups = register_experts(model, parameter_groups(model, cfg.train.weight_decay), ctx, num_experts=4)
    opt = clipped_optimizer(groups, cfg.train, ctx) if plan.optimizer_from == "llm" else None
    engine = initialize_engine(model, optimizer=opt, parameter_groups=groups, ds_config=ds,
                               lr_scheduler=make_scheduler(cfg.train), mpu=MeshMPU(ctx))  # fmt: skip
    steps = make_steps(engine, cfg, ctx, plan, rng)

    ref_cfg = dataclasses.replace(cfg.model, sequence_parallel=False)
    ref = build_model(ref_cfg, seed=cfg.train.seed)  # one process, every expert
    if case.endswith("fp8"):
        assert use_fp8(ref, ParallelContext.single()) == []
    ref.moe.aux_grad_scale = 1 / dp  # DP micro-batches of accumulation: the LM loss is divided by DP too
    ref_opt = torch.optim.AdamW(parameter_groups(ref, cfg.train.weight_decay), lr=cfg.train.lr,
                                betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)  # fmt: skip
    single = ParallelContext.single()
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        micro = [torch.randint(0, VOCAB, (2, 17), generator=gen) for _ in range(dp)]  # one per data-parallel rank
        result = steps.train(iter([micro[ctx.dp_rank]]), None, 2 * dp)
        ref_loss = sum(ref(*model_inputs(t, cfg.data)) for t in micro) / dp
        ref_loss.backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.clip_grad))
        ref_opt.step()
        ref_opt.zero_grad()
        update_expert_bias(ref, single)
        assert abs(result.loss - float(ref_loss)) < 2e-6, f"step {step}: loss {result.loss} != {float(ref_loss)}"
        assert result.grad_norm is not None and abs(result.grad_norm - ref_norm) < 1e-5 * ref_norm, (
            f"step {step}: grad norm {result.grad_norm} != {ref_norm}"
        )
        ours, theirs = steps.moe_metrics(), moe_metrics(ref, single)
        assert ours.keys() == theirs.keys() and ours, f"{sorted(ours)} != {sorted(theirs)}"
        for key, value in theirs.items():
            assert abs(ours[key] - value) < 1e-5 * max(1.0, abs(value)), f"step {step}: {key} {ours[key]} != {value}"
        if case == "capacity":
            assert theirs["moe_dropped_fraction"] > 0  # the capacity does drop copies here

    ref_params = dict(ref.named_parameters())
    for name, p in engine.module.named_parameters():
        expected, got = ref_params[name], _gathered(p, ctx)
        if getattr(p, "expert_parallel", False):  # this rank's experts (all four without EP, else two)
            n = 4 // ctx.ep
            expected = expected[ctx.ep_rank * n : ctx.ep_rank * n + n]
        if name in ("embed.weight", "lm_head.weight"):  # the vocabulary padding depends on TP
            expected, got = expected[:VOCAB], got[:VOCAB]
        diff = (got - expected).abs().max().item()
        assert diff < 1e-5, f"rank {rank}: {name} differs by {diff}"
    for name, buf in ref.named_buffers():
        if name.endswith("expert_bias"):
            assert torch.equal(dict(engine.module.named_buffers())[name], buf), name

    if save_dir is not None:  # the experts of both ranks reach the checkpoint, and merge into the full model
        tag = save_checkpoint(engine, cfg, {"iteration": STEPS, "consumed_samples": 4 * STEPS}, ctx=ctx, rng=rng)
        if rank == 0:
            _, state, meta = load_model_state(tag)
            assert meta["expert_parallel"] == 2
            for name, value in ref.state_dict().items():
                if "rotary" not in name:
                    rows = VOCAB if name in ("embed.weight", "lm_head.weight") else None
                    torch.testing.assert_close(state[name][:rows], value.float()[:rows], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "zero, case", [(0, "gpt2"), (1, "llama_shared"), (2, "capacity"), (1, "gpt2"), (1, "llama_fp8")]
)
def test_expert_parallel_training_matches_one_process(zero: int, case: str, tmp_path: Path) -> None:
    spawn(_run, 2, zero, case, tmp_path / "ckpt" if (zero, case) in ((0, "gpt2"), (1, "llama_shared")) else None)


@pytest.mark.parametrize("world, zero, case", [(4, 1, "llama_shared"), (2, 2, "llama_sp"), (4, 0, "gpt2")])
def test_expert_and_tensor_parallelism_match_one_process(world: int, zero: int, case: str, tmp_path: Path) -> None:
    """TP 2: the experts replicated over TP, each TP rank routing its share of the tokens (its sequence
    shard under sequence parallelism); world 4 = TP 2 x DP 2 with EP 2."""
    spawn(_run, world, zero, case, tmp_path / "ckpt" if world == 4 and zero == 1 else None, 2)


def _run_pipeline(rank: int, world: int, zero: int, save_dir: Path) -> None:
    """PP 2 x DP 2 with EP 2 through llm's pipeline steps against one process (world 4)."""
    from llm.checkpoint.engine import save_checkpoint
    from llm.checkpoint.merge import load_model_state
    from llm.engine.build import initialize_engine
    from llm.engine.deepspeed_config import deepspeed_setup
    from llm.engine.experts import register_experts
    from llm.model.names import canonical_name
    from llm.model.pipeline import build_pipeline_model
    from llm.training.lr_schedule import make_scheduler
    from llm.training.optim import clipped_optimizer
    from llm.training.steps import make_steps

    cfg = load_config(None, [*OVERRIDES, *CASES["llama_shared"], "model.num_layers=4", "model.moe_layer_freq=[0, 1, 0, 1]",
                             "parallel.pipeline_model_parallel_size=2", f"deepspeed_config=configs/deepspeed/zero{zero}.json",
                             f"checkpoint.dir={save_dir}"])  # fmt: skip
    ctx = ParallelContext.build(pp=2, ep=2)
    ds, plan = deepspeed_setup(cfg, world, cuda=False)
    rng = RNGTracker()
    pipe = build_pipeline_model(cfg, ctx, rng)
    groups = register_experts(pipe, parameter_groups(pipe, cfg.train.weight_decay), ctx, num_experts=4)
    opt = clipped_optimizer(groups, cfg.train, ctx) if plan.optimizer_from == "llm" else None
    engine = initialize_engine(pipe, optimizer=opt, parameter_groups=groups, ds_config=ds,
                               lr_scheduler=make_scheduler(cfg.train), mpu=None)  # fmt: skip
    steps = make_steps(engine, cfg, ctx, plan, rng)
    ref = build_model(cfg.model, seed=cfg.train.seed)
    ref.moe.aux_grad_scale = 0.5
    ref_opt = torch.optim.AdamW(parameter_groups(ref, cfg.train.weight_decay), lr=cfg.train.lr,
                                betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)  # fmt: skip
    single = ParallelContext.single()
    gen = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        micro = [torch.randint(0, VOCAB, (2, 17), generator=gen) for _ in range(2)]
        result = steps.train(iter([micro[ctx.dp_rank]]), None, 4)
        ref_loss = sum(ref(*model_inputs(t, cfg.data)) for t in micro) / 2
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.clip_grad)
        ref_opt.step()
        ref_opt.zero_grad()
        update_expert_bias(ref, single)
        assert abs(result.loss - float(ref_loss)) < 2e-6, f"step {step}: loss {result.loss} != {float(ref_loss)}"
        ours, theirs = steps.moe_metrics(), moe_metrics(ref, single)
        assert ours.keys() == theirs.keys(), f"{sorted(ours)} != {sorted(theirs)}"
        for key, value in theirs.items():
            assert abs(ours[key] - value) < 1e-5 * max(1.0, abs(value)), f"step {step}: {key} {ours[key]} != {value}"
    ref_params = dict(ref.named_parameters())
    for name, p in engine.module.named_parameters():
        canon = canonical_name(name, cfg.model.num_layers)
        if canon not in ref_params or (ctx.pp_rank == 1 and canon == "pos_embed.weight"):
            continue
        expected = ref_params[canon]
        if getattr(p, "expert_parallel", False):
            expected = expected[ctx.ep_rank * 2 : ctx.ep_rank * 2 + 2]
        rows = VOCAB if canon in ("embed.weight", "lm_head.weight") else p.shape[0]
        diff = (p[:rows] - expected[:rows]).abs().max().item()
        assert diff < 1e-5, f"rank {rank}: {canon} differs by {diff}"
    tag = save_checkpoint(engine, cfg, {"iteration": STEPS, "consumed_samples": 4 * STEPS}, ctx=ctx, rng=rng)
    if rank == 0:  # every stage's and EP rank's experts merge into the full model
        _, state, _ = load_model_state(tag)
        for name, value in ref.state_dict().items():
            if "rotary" not in name:
                rows = VOCAB if name in ("embed.weight", "lm_head.weight") else None
                torch.testing.assert_close(state[name][:rows], value.float()[:rows], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("zero", [0, 1])
def test_expert_parallelism_inside_pipeline_stages_matches_one_process(zero: int, tmp_path: Path) -> None:
    spawn(_run_pipeline, 4, zero, tmp_path / "ckpt")


def _fp8_experts_layer(rank: int, world: int, tp: int) -> None:
    """One MoE layer with FP8 experts at EP 2 (and TP `tp`, each TP rank routing its share of the tokens)
    against one process running each data-parallel rank's micro-batch alone. The two micro-batches
    differ in size by 2^10, so each expert's rows from both span that range: a scale shared by an
    expert's rows would follow the layout; a scale per row does not."""
    cfg = load_config(None, [*OVERRIDES, *CASES["llama_fp8"]]).model
    ctx = ParallelContext.build(tp=tp, ep=2)
    layer = build_model(cfg, seed=3, ctx=ctx).layers[0].mlp
    ref = build_model(cfg, seed=3).layers[0].mlp
    assert use_fp8(layer, ctx) == [] and use_fp8(ref, ParallelContext.single()) == []
    assert all(m.experts.fc.fp8 and m.experts.proj.fp8 for m in (layer, ref))  # the routed experts in float8
    gen = torch.Generator().manual_seed(5)
    micro = [torch.randn(2, 16, 32, generator=gen) * 2.0 ** (10 * r) for r in range(ctx.dp)]
    upstream = [torch.randn(2, 16, 32, generator=gen) for _ in range(ctx.dp)]
    x = micro[ctx.dp_rank].clone().requires_grad_(True)  # the same on every TP rank (no sequence parallelism)
    out = layer(x)
    out.backward(upstream[ctx.dp_rank])
    for r in range(ctx.dp):  # micro-batch by micro-batch, gradients accumulating
        xr = micro[r].clone().requires_grad_(True)
        want = ref(xr)
        want.backward(upstream[r])
        if r == ctx.dp_rank:
            ref_out, ref_dx = want.detach(), xr.grad
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-6, atol=1e-6 * float(ref_out.abs().max()))
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-5, atol=1e-6 * float(ref_dx.abs().max()))
    experts = [(n, p) for n, p in layer.named_parameters() if getattr(p, "expert_parallel", False)]
    assert len(experts) == 2
    for name, p in experts:  # this rank's two experts, from every rank's rows (summed over TP)
        want = ref_grads[name][2 * ctx.ep_rank : 2 * ctx.ep_rank + 2]
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_experts_under_expert_parallelism_cast_as_one_process(tp: int) -> None:
    spawn(_fp8_experts_layer, 2 * tp, tp)
