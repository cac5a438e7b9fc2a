"""Context-parallel attention alone (gloo, C = 2 and 4) against full causal attention in one process:
ring attention (p2p, with the load-balanced chunks) and Ulysses (a2a), outputs and gradients of
queries, keys and values to 1e-5 in fp32, with grouped-query attention, with and without document
masks; and the GPT at CP (x TP) against one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.parallel.cp_attention import cp_positions, cp_shard, ring_attention, ulysses_attention
from llm.parallel.process_groups import ParallelContext
from tests.distributed.harness import spawn

pytestmark = pytest.mark.distributed
B, HEADS, S, D = 2, 4, 32, 8


def _unshard(shards: list[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
    """The inverse of `cp_shard` over every rank's shard (in rank order)."""
    full = torch.cat(shards, dim=dim)
    positions = torch.cat([cp_positions(full.shape[dim], len(shards), r) for r in range(len(shards))])
    return full.index_select(dim, torch.argsort(positions))


def _attend(doc_ids: torch.Tensor | None):
    from llm.model.layers import _document_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if doc_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return _document_attention(q, k, v, doc_ids, dropout=0.0, gqa=gqa)

    return attend


def _run(rank: int, world: int, kind: str, groups: int, docs: bool) -> None:
    ctx = ParallelContext.build(cp=world)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, S, D, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, groups, S, D, generator=gen, requires_grad=True) for _ in range(2))
    weight = torch.randn(B, HEADS, S, D, generator=gen)  # a loss that weighs every output differently
    doc_ids = None
    if docs:
        doc_ids = torch.zeros(B, S, dtype=torch.long)
        doc_ids[0, 5:] += 1
        doc_ids[0, 20:] += 1
        doc_ids[1, 11:] += 1
    ref = _attend(doc_ids)(q, k, v)
    (ref * weight).sum().backward()

    local = [cp_shard(t.detach(), world, rank, dim=2).requires_grad_() for t in (q, k, v)]
    if kind == "p2p":
        out = ring_attention(*local, ctx, doc_ids)
    else:
        out = ulysses_attention(*local, ctx, _attend(doc_ids))
    (out * cp_shard(weight, world, rank, dim=2)).sum().backward()
    torch.testing.assert_close(out, cp_shard(ref.detach(), world, rank, dim=2), rtol=0, atol=1e-5)
    for name, full, part in zip("qkv", (q, k, v), local):
        torch.testing.assert_close(part.grad, cp_shard(full.grad, world, rank, dim=2), rtol=0, atol=1e-5,
                                   msg=f"d{name}")  # fmt: skip


@pytest.mark.parametrize(
    "world, kind, groups, docs",
    [(2, "p2p", 4, False), (4, "p2p", 2, False), (2, "p2p", 1, False), (2, "a2a", 2, False), (4, "a2a", 4, False),
     (2, "a2a", 2, True), (4, "a2a", 4, True), (2, "p2p", 2, True), (4, "p2p", 1, True)],
)  # fmt: skip
def test_context_parallel_attention_matches_full_attention(world: int, kind: str, groups: int, docs: bool) -> None:
    spawn(_run, world, kind, groups, docs)


def test_the_load_balanced_chunks_cover_the_sequence_once() -> None:
    for size in (1, 2, 4):
        every = torch.cat([cp_positions(32, size, r) for r in range(size)])
        assert sorted(every.tolist()) == list(range(32))
        # causal work per rank: the positions each rank's queries attend to sum to the same
        work = [int((cp_positions(32, size, r) + 1).sum()) for r in range(size)]
        assert len(set(work)) == 1, work
    x = torch.arange(2 * 32).view(2, 32)
    assert torch.equal(_unshard([cp_shard(x, 4, r) for r in range(4)]), x)
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 8"):
        cp_positions(36, 4, 0)


def _model(rank: int, world: int, arch: str, comm: str, tp: int) -> None:
    """The GPT at CP (x TP) against one process: the loss (the token mean over every chunk) and the
    gradients (each CP rank's summed over the CP group, as the DP x CP reduction will)."""
    from llm.config import ModelConfig
    from llm.model.gpt import build_model
    from llm.parallel.layers import merge_by_spec, partition_info

    cp = world // tp
    ctx = ParallelContext.build(tp=tp, cp=cp, cp_comm_type=comm)
    extra = {"num_query_groups": 2} if arch == "llama" else {}
    cfg = ModelConfig(architecture=arch, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=300, **extra)  # fmt: skip
    model, ref = build_model(cfg, seed=3, ctx=ctx), build_model(cfg, seed=3)
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens[0, 3] = 0  # an ignored label: the mean counts the real tokens of every chunk
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, 5] = -100
    loss = model(cp_shard(x, cp, ctx.cp_rank), cp_shard(y, cp, ctx.cp_rank))
    ref_loss = ref(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=2e-6)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.clone()
        torch.distributed.all_reduce(g, group=ctx.groups["cp"])
        spec = partition_info(p)
        if spec is not None and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=ctx.groups["tp"])
            g = merge_by_spec(parts, spec)
        expected = ref_params[name].grad
        rows = 300 if name in ("embed.weight", "lm_head.weight") else g.shape[0]
        torch.testing.assert_close(g[:rows], expected[:rows], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "world, arch, comm, tp", [(2, "gpt2", "p2p", 1), (2, "llama", "a2a", 1), (4, "llama", "p2p", 2)]
)
def test_the_gpt_at_context_parallelism_matches_one_process(world: int, arch: str, comm: str, tp: int) -> None:
    """CP 2 with learned positions (ring) and rotary positions (Ulysses), and TP 2 x CP 2 (ring)."""
    spawn(_model, world, arch, comm, tp)


def test_one_ring_block_through_the_fused_cpu_kernel_matches_explicit_attention() -> None:
    """The block the ring hands to torch's fused CPU attention (the same check runs on CUDA with flash
    attention in tests/gpu)."""
    from tests.gpu.test_cuda import _block_check

    _block_check("cpu", torch.float32, 1e-5)
