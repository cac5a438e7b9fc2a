"""The pipeline model (DeepSpeed PipelineModule + PipelineEngine, 2 stages, gloo) against the plain
model on the same weights and data: losses, and the weights after optimizer steps (which carry the
gradients, the clipping norm and AdamW); tied embeddings stay tied across stages."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llm.config import load_config
from llm.model.gpt import build_model, parameter_groups
from llm.model.inputs import model_inputs
from llm.model.names import canonical_prefix
from llm.model.pipeline import build_pipeline_model
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker
from llm.training.steps import pipeline_pairs
from tests.distributed.harness import spawn

pytestmark = pytest.mark.distributed
VOCAB, STEPS = 300, 3
OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    f"model.vocab_size={VOCAB}", "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-3",
    "train.lr_warmup_iters=0", "train.lr_decay_style=constant", "train.clip_grad=0.05", "train.precision=fp32",
    "parallel.pipeline_model_parallel_size=2",
]  # fmt: skip


def _canonical(name: str, num_layers: int) -> str:
    if name.startswith("tied_modules.embed."):
        return name.removeprefix("tied_modules.embed.")
    idx, rest = name.split(".", 1)
    return canonical_prefix(int(idx), num_layers) + rest


MOE = ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=16", "model.moe_z_loss_coeff=1e-3",
       "model.moe_layer_freq=[0, 1]", "model.moe_shared_expert_intermediate_size=16"]  # fmt: skip


def _run(rank: int, world: int, arch: str, zero: int, docs: bool = False, norms: int = 0, moe: bool = False) -> None:
    import deepspeed

    from llm.engine.deepspeed_config import build_deepspeed_config
    from llm.training.lr_schedule import make_scheduler
    from llm.training.optim import ClippedAdamW

    cfg = load_config(
        None,
        [*OVERRIDES, f"model.architecture={arch}", f"deepspeed_config=configs/deepspeed/zero{zero}.json",
         *(["data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true",
            "data.eod_token_id=7"] if docs else []),
         *(["model.parallel_block=true", f"model.parallel_block_norms={norms}"] if norms else []),
         *(MOE if moe else [])],
    )  # fmt: skip
    ctx = ParallelContext.build(tp=1, pp=2)
    rng = RNGTracker()
    pipe = build_pipeline_model(cfg, ctx, rng)
    pipe.moe.aux_grad_scale = 0.5  # MoE: what PipelineSteps sets for two micro-batches (the LM loss's scale)
    ds = build_deepspeed_config(cfg, world, cuda=False)
    groups = parameter_groups(pipe, cfg.train.weight_decay)
    opt = None if "optimizer" in ds else ClippedAdamW(groups, cfg.train, ctx)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=groups, optimizer=opt, config=ds,
                                      lr_scheduler=make_scheduler(cfg.train))  # fmt: skip

    ref = build_model(cfg.model, seed=cfg.train.seed)
    ref.moe.aux_grad_scale = 0.5  # MoE: two micro-batches of accumulation, as the LM loss
    ref_opt = torch.optim.AdamW(parameter_groups(ref, cfg.train.weight_decay), lr=cfg.train.lr,
                                betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        micro = [torch.randint(0, VOCAB, (2, 17), generator=gen) for _ in range(2)]
        if docs:  # end-of-document tokens: (ids, positions, doc ids) travel through the stages
            for t in micro:
                t[:, [2, 8, 9]] = 7
        loss = engine.train_batch(pipeline_pairs(iter(micro), cfg.data, ctx))
        ref_loss = sum(ref(*model_inputs(t, cfg.data)) for t in micro) / 2
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.clip_grad)
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(float(loss), float(ref_loss), atol=2e-6, rtol=0)

    ref_params = dict(ref.named_parameters())
    last_stage = ctx.pp_rank == 1
    for name, p in engine.module.named_parameters():
        canon = _canonical(name, cfg.model.num_layers)
        if last_stage and canon == "pos_embed.weight":
            continue  # the last stage's copy of the embedding layer only uses the tied token rows
        rows = VOCAB if canon in ("embed.weight", "lm_head.weight") else p.shape[0]
        diff = (p[:rows] - ref_params[canon][:rows]).abs().max().item()
        assert diff < 1e-5, f"stage {ctx.pp_rank}: {canon} differs by {diff}"
    if cfg.model.tied:  # the two stages' copies of the tied embedding are still identical
        w = engine.module.tied_modules["embed"].embed.weight.detach().contiguous()
        both = [torch.empty_like(w) for _ in range(world)]
        dist.all_gather(both, w)
        assert torch.equal(both[0], both[1])


@pytest.mark.parametrize(
    "arch, zero, docs, norms, moe",
    [("gpt2", 0, False, 1, False), ("gpt2", 1, True, 0, False), ("llama", 1, True, 2, False), ("llama", 0, False, 0, True)],
)  # fmt: skip
def test_pipeline_matches_plain_model(arch: str, zero: int, docs: bool, norms: int, moe: bool) -> None:
    """docs: document-aware training (attention and positions per document, EOD loss masked);
    norms: parallel attention + MLP blocks with that many norms (0: the sequential block); moe: a
    mixture of experts in the second block (on the second stage: its auxiliary losses' gradient
    reaches the router through the pipeline's backward)."""
    spawn(_run, 2, arch, zero, docs, norms, moe)
