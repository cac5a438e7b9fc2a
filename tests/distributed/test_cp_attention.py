"""Context-parallel attention alone (gloo, C = 2 and 4) against full causal attention in one process:
ring attention (p2p, with the load-balanced chunks) and Ulysses (a2a), outputs and gradients of
queries, keys and values to 1e-5 in fp32, with grouped-query attention, and Ulysses with
document masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.parallel.context import ParallelContext
from llm.parallel.cp_attention import (
    cp_positions,
    cp_shard,
    cp_unshard,
    ring_attention,
    ulysses_attention,
)
from tests.distributed.harness import spawn

pytestmark = pytest.mark.distributed
B, HEADS, S, D = 2, 4, 32, 8


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
        out = ring_attention(*local, ctx)
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
     (2, "a2a", 2, True), (4, "a2a", 4, True)],
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
    assert torch.equal(cp_unshard([cp_shard(x, 4, r) for r in range(4)]), x)
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 8"):
        cp_positions(36, 4, 0)
