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


def _fp8_column_then_row(rank: int, world: int, tp: int, cp: int) -> None:
    """A column-parallel then a row-parallel linear in FP8 at TP x CP (the sequence split into CP
    chunks) against the same two layers in one process. One TP shard of each weight and one CP chunk
    of the tokens are 16 x larger than the rest, so each shard's own amax would give another scale
    than the whole tensor's: only the maximum over the sharing ranks casts as one process does."""
    from llm.parallel.fp8 import Fp8Groups, fp8_linear
    from llm.parallel.layers import use_fp8

    ctx = ParallelContext.build(tp=tp, cp=cp)
    g = torch.Generator().manual_seed(2)
    hidden, ffn, seq = 32, 32 * tp, 16 * cp
    w1, w2 = torch.randn(ffn, hidden, generator=g) * 0.1, torch.randn(hidden, ffn, generator=g) * 0.1
    w1[: ffn // tp] *= 16  # TP shard 0's rows of the column layer, columns of the row layer
    w2[:, : ffn // tp] *= 16
    x, upstream = torch.randn(2, seq, hidden, generator=g), torch.randn(2, seq, hidden, generator=g)
    x[:, : seq // cp] *= 16  # CP chunk 0's tokens
    upstream[:, seq // cp :] *= 16
    col = ColumnParallelLinear(hidden, ffn, bias=False, ctx=ctx)
    row = RowParallelLinear(ffn, hidden, bias=False, ctx=ctx)
    with torch.no_grad():
        col.weight.copy_(shard_tensor(w1, dim=0, stride=1, rank=ctx.tp_rank, size=tp))
        row.weight.copy_(shard_tensor(w2, dim=1, stride=1, rank=ctx.tp_rank, size=tp))
    assert use_fp8(torch.nn.ModuleList([col, row]), ctx) == []
    chunk = slice(ctx.cp_rank * (seq // cp), (ctx.cp_rank + 1) * (seq // cp))
    xp = x[:, chunk].clone().requires_grad_(True)
    y = row(col(xp))
    y.backward(upstream[:, chunk])
    xr, w1r, w2r = (t.clone().requires_grad_(True) for t in (x, w1, w2))
    yr = fp8_linear(fp8_linear(xr, w1r, Fp8Groups()), w2r, Fp8Groups())
    yr.backward(upstream)
    torch.testing.assert_close(y, yr[:, chunk].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xp.grad, xr.grad[:, chunk], rtol=1e-5, atol=1e-5)
    for layer, full, dim in ((col, w1r, 0), (row, w2r, 1)):
        grad = layer.weight.grad.clone()  # each CP rank's tokens' part: the sum is the whole batch's
        torch.distributed.all_reduce(grad, group=ctx.groups["cp"]) if cp > 1 else None
        expected = shard_tensor(full.grad, dim=dim, stride=1, rank=ctx.tp_rank, size=tp)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tp, cp", [(2, 1), (2, 2)])
def test_fp8_layers_cast_every_sharded_operand_with_the_whole_tensors_scale(tp: int, cp: int) -> None:
    spawn(_fp8_column_then_row, tp * cp, tp, cp)
