"""Each tensor-parallel layer against its dense equivalent on the unsharded weights (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.parallel.cross_entropy import vocab_parallel_cross_entropy
from llm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    merge_shards,
    shard_tensor,
)
from llm.parallel.mappings import gather_from_sequence, scatter_to_sequence
from llm.parallel.process_groups import ParallelContext
from tests.distributed.harness import spawn

pytestmark = pytest.mark.distributed
ATOL = 1e-5


def _gather(t: torch.Tensor, ctx: ParallelContext, dim: int, stride: int = 1) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(ctx.tp)]
    torch.distributed.all_gather(parts, t.contiguous(), group=ctx.groups["tp"])
    return merge_shards(parts, dim=dim, stride=stride)


def _column(rank: int, world: int) -> None:
    ctx = ParallelContext.build(tp=world)
    g = torch.Generator().manual_seed(0)
    for stride, gather in [(1, False), (2, False), (1, True)]:
        w, b = torch.randn(8 * world, 6, generator=g), torch.randn(8 * world, generator=g)
        x = torch.randn(3, 5, 6, generator=g, requires_grad=True)
        layer = ColumnParallelLinear(6, 8 * world, bias=True, ctx=ctx, stride=stride, gather_output=gather)
        with torch.no_grad():
            layer.weight.copy_(shard_tensor(w, dim=0, stride=stride, rank=ctx.tp_rank, size=world))
            layer.bias.copy_(shard_tensor(b, dim=0, stride=stride, rank=ctx.tp_rank, size=world))
        xp = x.detach().clone().requires_grad_(True)
        y = layer(xp)
        dense = F.linear(x, w, b)
        full_y = y if gather else _gather(y, ctx, -1, stride)
        torch.testing.assert_close(full_y, dense, atol=ATOL, rtol=0)
        upstream = torch.randn(dense.shape, generator=g)
        dense.backward(upstream)
        mine = (
            upstream
            if gather
            else shard_tensor(upstream, dim=-1, stride=stride, rank=ctx.tp_rank, size=world)
        )
        y.backward(mine)
        torch.testing.assert_close(xp.grad, x.grad, atol=ATOL, rtol=0)  # all-reduced input gradient
        w_grad = torch.einsum("bso,bsi->oi", upstream, x.detach())
        torch.testing.assert_close(_gather(layer.weight.grad, ctx, 0, stride), w_grad, atol=1e-4, rtol=0)


def _row(rank: int, world: int) -> None:
    ctx = ParallelContext.build(tp=world)
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 4 * world, generator=g), torch.randn(6, generator=g)
    x = torch.randn(2, 4, 4 * world, generator=g, requires_grad=True)
    layer = RowParallelLinear(4 * world, 6, bias=True, ctx=ctx)
    with torch.no_grad():
        layer.weight.copy_(shard_tensor(w, dim=1, stride=1, rank=ctx.tp_rank, size=world))
        layer.bias.copy_(b)
    xp = shard_tensor(x.detach(), dim=-1, stride=1, rank=ctx.tp_rank, size=world).requires_grad_(True)
    y = layer(xp)
    dense = F.linear(x, w, b)
    torch.testing.assert_close(y, dense, atol=ATOL, rtol=0)
    upstream = torch.randn(dense.shape, generator=g)
    dense.backward(upstream)
    y.backward(upstream)
    torch.testing.assert_close(_gather(xp.grad, ctx, -1), x.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        _gather(layer.weight.grad, ctx, 1),
        torch.einsum("bso,bsi->oi", upstream, x.detach()),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(layer.bias.grad, upstream.sum((0, 1)), atol=ATOL, rtol=0)


def _embedding_and_loss(rank: int, world: int) -> None:
    ctx = ParallelContext.build(tp=world)
    g = torch.Generator().manual_seed(2)
    vocab, padded, hidden = 37, 64, 8  # padded rows 37..63 must never take probability mass
    w = torch.randn(padded, hidden, generator=g)
    ids = torch.randint(0, vocab, (3, 7), generator=g)
    emb = VocabParallelEmbedding(padded, hidden, ctx=ctx)
    with torch.no_grad():
        emb.weight.copy_(shard_tensor(w, dim=0, stride=1, rank=ctx.tp_rank, size=world))
    out = emb(ids)
    torch.testing.assert_close(out, F.embedding(ids, w), atol=0, rtol=0)
    out.sum().backward()
    dense_w = w.clone().requires_grad_(True)
    F.embedding(ids, dense_w).sum().backward()
    torch.testing.assert_close(_gather(emb.weight.grad, ctx, 0), dense_w.grad, atol=0, rtol=0)

    logits = torch.randn(21, padded, generator=g) * 3
    logits[:, vocab:] = 50.0  # huge padded logits: must be ignored
    target = torch.randint(0, vocab, (21,), generator=g)
    full = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full[:, :vocab], target, reduction="none")
    local = shard_tensor(logits, dim=1, stride=1, rank=ctx.tp_rank, size=world).requires_grad_(True)
    got = vocab_parallel_cross_entropy(
        local, target, ctx, vocab_start=ctx.tp_rank * padded // world, vocab_size=vocab
    )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    upstream = torch.rand(21, generator=g)
    ref.backward(upstream)
    got.backward(upstream)
    torch.testing.assert_close(_gather(local.grad, ctx, 1), full.grad, atol=1e-6, rtol=0)


def _sequence_mappings(rank: int, world: int) -> None:
    ctx = ParallelContext.build(tp=world)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4 * world, 5, generator=g, requires_grad=True)
    mine = scatter_to_sequence(x, ctx)
    assert mine.shape == (2, 4, 5)
    back = gather_from_sequence(mine, ctx)
    torch.testing.assert_close(back, x.detach(), atol=0, rtol=0)
    # gather's backward reduce-scatters; scatter's backward all-gathers: d(sum(back * c))/dx = c summed over ranks
    c = torch.full_like(back, float(rank + 1))
    (back * c).sum().backward()
    expected = torch.full_like(x, float(sum(range(1, world + 1))))
    torch.testing.assert_close(x.grad, expected, atol=0, rtol=0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fn", [_column, _row, _embedding_and_loss, _sequence_mappings])
def test_layer_matches_dense(fn, world: int) -> None:
    spawn(fn, world)
