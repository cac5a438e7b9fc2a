"""The full GPT at TP = 2 and 4 against TP = 1 on the same weights and data: logits, loss, gradients,
a few optimizer steps, dropout RNG streams (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch

from llm.checkpoint.engine import parameter_splits
from llm.config import DataConfig, ModelConfig
from llm.model.gpt import build_model
from llm.model.inputs import model_inputs
from llm.parallel.layers import merge_by_spec, partition_info, use_fp8
from llm.parallel.process_groups import ParallelContext
from llm.parallel.random import RNGTracker
from tests.distributed.harness import spawn

pytestmark = pytest.mark.distributed
VOCAB = 300  # padded to 384 at TP 1 and 512 at TP 2/4: padding must not change anything


def _cfg(arch: str, sp: bool, groups: int = 2, norms: int = 0, chunk: int | None = None) -> ModelConfig:
    """norms: 0 = the sequential block, 1 or 2 = the parallel block with that many norms; chunk: the
    LM head and loss over chunks of that many tokens (model.loss_chunk_tokens)."""
    extra: dict = {"num_query_groups": groups} if arch == "llama" else {}
    if chunk:
        extra["loss_chunk_tokens"] = chunk
    if norms:
        extra.update(parallel_block=True, parallel_block_norms=norms)
    return ModelConfig(architecture=arch, num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16,
                       vocab_size=VOCAB, sequence_parallel=sp, **extra)  # fmt: skip


def _gathered(p: torch.nn.Parameter, ctx: ParallelContext) -> torch.Tensor:
    g = p.grad
    if not getattr(p, "tensor_model_parallel", False):
        return g
    parts = [torch.empty_like(g) for _ in range(ctx.tp)]
    torch.distributed.all_gather(parts, g.contiguous(), group=ctx.groups["tp"])
    return merge_by_spec(parts, partition_info(p))


def _expected_spec(name: str, cfg: ModelConfig, tp: int) -> dict | None:
    """Megatron's splits, written out independently of the layers: what checkpoints must record."""
    if name in ("embed.weight", "lm_head.weight"):
        return {"dim": 0, "stride": 1}
    if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
        if cfg.kv_groups % tp == 0:
            return {"dim": 0, "stride": 1}
        return {"qkv": [cfg.num_attention_heads, cfg.kv_groups, cfg.head_dim]}
    if name.endswith(("mlp.fc.weight", "mlp.fc.bias")):
        return {"dim": 0, "stride": 2 if cfg.is_llama else 1}
    if name.endswith(("attention.proj.weight", "mlp.proj.weight")):
        return {"dim": 1, "stride": 1}
    return None


def _parity(
    rank: int, world: int, arch: str, sp: bool, groups: int = 2, docs: bool = False, norms: int = 0,
    chunk: int | None = None, fp8: bool = False,
) -> None:  # fmt: skip
    torch.manual_seed(0)
    ctx = ParallelContext.build(tp=world)
    cfg = _cfg(arch, sp, groups, norms, chunk)
    dense_cfg = _cfg(arch, False, groups, norms)
    tp_model = build_model(cfg, seed=7, ctx=ctx)
    expected = {n: _expected_spec(n, cfg, world) for n, _ in tp_model.named_parameters()}
    recorded = {n: e["spec"] for n, e in parameter_splits(tp_model, cfg.num_layers).items() if e["spec"]}
    assert recorded == {n: spec for n, spec in expected.items() if spec is not None}
    ref = build_model(dense_cfg, seed=7)  # layout-independent init: same full weights
    if fp8:  # the linear layers' matmuls in float8 on both (train.precision: fp8)
        assert use_fp8(tp_model, ctx) == [] and use_fp8(ref, ParallelContext.single()) == []
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    extra: dict = {}
    if docs:  # document-aware: end-of-document tokens in every sample, attention and positions per document
        tokens[:, [3, 4, 9]] = 7
        _, _, positions, doc_ids = model_inputs(tokens, DataConfig(reset_attention_mask=True, reset_position_ids=True,
                                                                   eod_token_id=7))  # fmt: skip
        extra = {"positions": positions, "doc_ids": doc_ids}
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt_tp = torch.optim.AdamW(tp_model.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for step in range(3):
        with torch.no_grad():
            torch.testing.assert_close(tp_model(x, **extra), ref(x, **extra), atol=5e-5, rtol=1e-5)
        loss_tp, loss_ref = tp_model(x, y, **extra), ref(x, y, **extra)
        torch.testing.assert_close(loss_tp, loss_ref, atol=2e-6, rtol=0)
        loss_tp.backward()
        loss_ref.backward()
        ref_params = dict(ref.named_parameters())
        for name, p in tp_model.named_parameters():
            full = _gathered(p, ctx)
            expected = ref_params[name].grad
            if name in ("embed.weight", "lm_head.weight"):
                full, expected = full[:VOCAB], expected[:VOCAB]
                assert torch.count_nonzero(_gathered(p, ctx)[VOCAB:]) == 0, "padded rows got gradient"
            torch.testing.assert_close(full, expected, atol=2e-5, rtol=0, msg=lambda m, s=step, n=name: f"step {s}: {n}: {m}")
        opt_tp.step()
        opt_ref.step()
        opt_tp.zero_grad()
        opt_ref.zero_grad()


@pytest.mark.parametrize(
    "world, arch, sp",
    [(2, "gpt2", False), (2, "llama", False), (2, "gpt2", True), (2, "llama", True), (4, "gpt2", False)],
)
def test_tensor_parallel_model_matches_single_process(world: int, arch: str, sp: bool) -> None:
    spawn(_parity, world, arch, sp)


@pytest.mark.parametrize("world, arch, sp, norms", [(2, "gpt2", True, 1), (4, "llama", False, 2)])
def test_parallel_block_matches_single_process(world: int, arch: str, sp: bool, norms: int) -> None:
    spawn(_parity, world, arch, sp, 2, False, norms)


@pytest.mark.parametrize("world, arch, sp, chunk", [(2, "gpt2", True, 7), (4, "llama", False, 16)])
def test_chunked_loss_under_tensor_parallelism_matches_the_whole_logits_of_one_process(
    world: int, arch: str, sp: bool, chunk: int
) -> None:
    """model.loss_chunk_tokens: the vocabulary-parallel LM head and loss over chunks of tokens (7: the
    last chunk shorter) against one process computing the whole logits."""
    spawn(_parity, world, arch, sp, 2, False, 0, chunk)


@pytest.mark.parametrize("world, arch, sp", [(2, "gpt2", True), (4, "llama", False)])
def test_fp8_linears_under_tensor_parallelism_match_fp8_in_one_process(world: int, arch: str, sp: bool) -> None:
    """train.precision: fp8's matmuls (fp32 around them here, so that only float8 differs): every
    operand sharded over TP gets the scale of the whole tensor, so the TP model casts exactly what one
    process casts: the same logits, loss and gradients to fp32 rounding, over three AdamW steps."""
    spawn(_parity, world, arch, sp, 4, False, 0, None, True)


def test_document_aware_attention_under_tensor_parallelism() -> None:
    """Rotary positions per document, sequence-parallel; learned positions: the pipeline test."""
    spawn(_parity, 2, "llama", True, 2, True)


@pytest.mark.parametrize("world, groups, sp", [(2, 1, False), (4, 2, False), (4, 1, True)])
def test_fewer_kv_groups_than_tp_ranks(world: int, groups: int, sp: bool) -> None:
    """Grouped-query attention with KV groups shared by TP / groups ranks (multi-query at groups = 1)."""
    spawn(_parity, world, "llama", sp, groups)


def _dropout_streams(rank: int, world: int) -> None:
    ctx = ParallelContext.build(tp=world)
    rng = RNGTracker()
    rng.seed(seed=5, tp_rank=ctx.tp_rank, pp_rank=0, device="cpu")
    replicated = torch.nn.functional.dropout(torch.ones(1000), 0.5)  # default stream
    with rng.fork():
        sharded = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    masks = [torch.empty(2, 1000) for _ in range(world)]
    torch.distributed.all_gather(masks, torch.stack([replicated, sharded]))
    assert all(torch.equal(m[0], masks[0][0]) for m in masks), "replicated regions need identical masks"
    assert not torch.equal(masks[0][1], masks[1][1]), "sharded regions need independent masks"
    state = rng.get_states()
    with rng.fork():
        a = torch.rand(5)
    rng.set_states(state)
    with rng.fork():
        assert torch.equal(torch.rand(5), a)  # restorable (checkpoints, recomputation)


def test_dropout_rng_streams() -> None:
    spawn(_dropout_streams, 2)


def _dropout_with_recompute(rank: int, world: int) -> None:
    """Activation checkpointing under TP with attention dropout recomputes the same masks."""
    ctx = ParallelContext.build(tp=world)
    grads = []
    for ckpt in (False, True):
        rng = RNGTracker()
        rng.seed(seed=3, tp_rank=ctx.tp_rank, pp_rank=0, device="cpu")
        cfg = ModelConfig(architecture="llama", num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=8,
                          vocab_size=VOCAB, attention_dropout=0.3, dropout=0.2, sequence_parallel=True,
                          activation_checkpointing=ckpt)  # fmt: skip
        model = build_model(cfg, seed=1, ctx=ctx, rng=rng).train()
        tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_activation_checkpointing_recomputes_sharded_dropout() -> None:
    spawn(_dropout_with_recompute, 2)
