"""Attention over a sequence split across the context-parallel group (parallel.context_parallel_size C).

Every rank holds S / C tokens of each sample, as two chunks of S / 2C: chunk r and chunk 2C - 1 - r
of the 2C equal chunks (`cp_positions`). Under causal attention the early chunk has little to attend
to and the late one much, so every rank does the same work (Megatron's load balance).

Two ways to attend (`parallel.cp_comm_type`, Megatron's names):

- `p2p`, ring attention (`ring_attention`): K/V blocks travel around the ring of C ranks, each rank
  attends its queries to the block it holds while the next one is in flight, and the partial results
  are merged by their log-sum-exp (the online softmax). Backward passes the blocks around again with
  their accumulated K/V gradients, which end at the block's owner. Communication: each rank sends
  C - 1 K/V blocks forward, and C - 1 K/V blocks plus C K/V gradient blocks backward.
- `a2a`, DeepSpeed-Ulysses (`ulysses_attention`): an all-to-all turns sequence shards of all heads
  into the whole sequence of H / C heads, attention runs as it does without CP (document masks
  included), and an all-to-all turns it back. Needs the (local) query and KV heads divisible by C.

Tensors are (B, heads, S_local, d), as llm's attention holds them; K/V may have fewer heads (GQA).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from llm.parallel.process_groups import ParallelContext


def cp_positions(seq_length: int, size: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """The positions in the full sequence of the S / C tokens context-parallel rank `rank` holds:
    chunk `rank` and chunk 2C - 1 - `rank` of 2C equal chunks."""
    if seq_length % (2 * size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x context-parallel size {2 * size}")
    c = seq_length // (2 * size)
    front = torch.arange(rank * c, (rank + 1) * c, device=device)
    return torch.cat([front, front + (2 * size - 1 - 2 * rank) * c])


def cp_shard(x: torch.Tensor, size: int, rank: int, *, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a full-length tensor (its two chunks, `cp_positions`) along `dim`."""
    if size == 1:
        return x
    return x.index_select(dim, cp_positions(x.shape[dim], size, rank, device=x.device))


class _SumOverCP(torch.autograd.Function):
    """Forward: all-reduce (sum) over the CP group, so every CP rank holds the whole sequence's value.
    Backward: identity: each rank's part keeps its own gradient (the data-parallel reduction, which
    spans DP x CP, sums the parts)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=pctx.groups["cp"])
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def cp_token_mean(losses: torch.Tensor, valid: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The mean token loss over every CP rank's tokens (never a mean of per-rank means): each rank
    divides its tokens' sum by the count over all ranks, and the parts are summed over CP."""
    count = valid.sum().to(losses.dtype)
    dist.all_reduce(count, group=ctx.groups["cp"])  # a count: no gradient
    part = losses.masked_fill(~valid, 0.0).sum() / count
    return _SumOverCP.apply(part, ctx)  # type: ignore[no-any-return]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` itself, whose gradient is multiplied by `factor` (where DeepSpeed divides CP ranks'
    gradient parts by DP x CP: llm.engine.deepspeed_config.OptimizerPlan.cp_grad_factor)."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)  # type: ignore[no-any-return]


# ---- ring attention (p2p) ------------------------------------------------------------------------
def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, g, S, d) K/V groups -> (B, heads, S, d), each group repeated for its query heads."""
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _fold(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `_expand` for gradients: (B, heads, S, d) -> (B, g, S, d), summed per group."""
    b, h, s, d = grad.shape
    return grad if h == groups else grad.view(b, groups, h // groups, s, d).sum(dim=2)


def _block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """Causal by global position, and with `doc_ids` (B, S: the whole sequence's document ids) inside
    each document: (Sq, Sk), or (B, 1, Sq, Sk) with documents."""
    mask = q_pos[:, None] >= k_pos[None, :]
    if doc_ids is None:
        return mask
    same = doc_ids[:, q_pos][:, :, None] == doc_ids[:, k_pos][:, None, :]  # (B, Sq, Sk)
    return (mask & same).unsqueeze(1)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, h, Sq, Sk)
    return s.masked_fill(~mask, float("-inf"))


def _ring_exchange(tensors: list[torch.Tensor], group: Any, ranks: list[int], rank: int) -> tuple[list[torch.Tensor], list[Any]]:
    """Starts sending `tensors` to the next rank of the ring and receiving the previous rank's; returns
    the receive buffers and the requests to wait on."""
    size = len(ranks)
    nxt, prv = ranks[(rank + 1) % size], ranks[(rank - 1) % size]
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in received]
    return received, dist.batch_isend_irecv(ops)


def _ring_blocks(rank: int, source: int, chunk: int) -> tuple[slice, slice, bool]:
    """What of the K/V block of CP rank `source` this rank's queries see, without document masks:
    (query rows, key rows, causal). Both hold their chunks i and 2C - 1 - i (`cp_positions`), so:
    their own block is causal over the 2 x chunk local tokens; a lower rank's first chunk is seen
    whole by both query chunks, its second by neither; a higher rank's two chunks are seen whole by
    the second query chunk only. Every block is then one unmasked (or causal) attention call."""
    every = slice(None)
    if source == rank:
        return every, every, True
    if source < rank:
        return every, slice(0, chunk), False
    return slice(chunk, None), every, False


def _fused_blocks(q: torch.Tensor) -> bool:
    """Blocks through torch's fused attention with its log-sum-exp: its CPU kernel (any dtype), and
    flash attention on a GPU in bf16 / fp16 (head dim <= 256); otherwise explicit masked matmuls."""
    if q.device.type == "cpu":
        return True
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256


def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One block's attention: (out in q's dtype, log-sum-exp fp32 (B, h, Sq), what its backward needs)."""
    if q.is_cuda:
        out, lse, *rest = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out, lse.float(), rest
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse.float(), None


def _block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, causal: bool, scale: float, saved: Any) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """One block's gradients given the merged output and log-sum-exp of all blocks (so that each block's
    probabilities are its share of the whole softmax): (dq, dk, dv)."""
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, rng_state, unused, _ = saved
        return tuple(torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, rng_state, unused, scale=scale))  # fmt: skip
    return tuple(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale))  # fmt: skip


class _RingAttention(torch.autograd.Function):
    """Forward: C steps; at each, attend to the K/V block held while the next block arrives from the
    previous rank (send/recv around the CP ring), and merge by log-sum-exp. Without document masks
    each block is one call of torch's fused attention on the rows and keys it sees (`_ring_blocks`);
    with them, masked matmuls by global position and document. Backward: the same ring, each block's
    gradients from the merged output and log-sum-exp; the blocks travel while each rank computes, each
    block's K/V gradient follows it once computed, and a last send returns it to its owner."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pctx: ParallelContext,
                scale: float, doc_ids: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        size, rank, group, ranks = pctx.cp, pctx.cp_rank, pctx.groups["cp"], pctx.groups["cp_ranks"]
        heads, s_local = q.shape[1], q.shape[2]
        fused = doc_ids is None and _fused_blocks(q)
        q_pos = cp_positions(s_local * size, size, rank, device=q.device)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv, saved = [k, v], []
        for step in range(size):
            pending = _ring_exchange(kv, group, ranks, rank) if step < size - 1 else None
            source = (rank - step) % size
            if fused:
                rows, keys, causal = _ring_blocks(rank, source, s_local // 2)
                block_out, block_lse, rest = _block_forward(q[:, :, rows], _expand(kv[0][:, :, keys], heads),
                                                            _expand(kv[1][:, :, keys], heads), causal, scale)  # fmt: skip
                saved.append(rest)
                if step == 0:  # every query sees itself: the log-sum-exp is finite from here on
                    out, lse = block_out.float(), block_lse
                else:
                    old, new = lse[:, :, rows], torch.logaddexp(lse[:, :, rows], block_lse)
                    out[:, :, rows] = (out[:, :, rows] * torch.exp(old - new)[..., None]
                                       + block_out.float() * torch.exp(block_lse - new)[..., None])  # fmt: skip
                    lse[:, :, rows] = new
            else:
                mask = _block_mask(q_pos, cp_positions(s_local * size, size, source, device=q.device), doc_ids)
                scores = _scores(q.float(), _expand(kv[0], heads).float(), mask, scale)
                block_lse = torch.logsumexp(scores, dim=-1)  # (B, h, Sq); -inf where nothing is visible
                block_out = torch.matmul(torch.exp(scores - block_lse.clamp_min(-1e30)[..., None]),
                                         _expand(kv[1], heads).float())  # fmt: skip
                new_lse = torch.logaddexp(lse, block_lse)
                old_w = torch.exp(lse - new_lse.clamp_min(-1e30)).nan_to_num(0.0)[..., None]
                new_w = torch.exp(block_lse - new_lse.clamp_min(-1e30)).nan_to_num(0.0)[..., None]
                out, lse = out * old_w + block_out * new_w, new_lse
            if pending is not None:
                received, requests = pending
                for request in requests:
                    request.wait()
                kv = received
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pctx, ctx.scale, ctx.doc_ids, ctx.fused, ctx.blocks = pctx, scale, doc_ids, fused, saved
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
        q, k, v, out, lse = ctx.saved_tensors
        pctx, scale, doc_ids = ctx.pctx, ctx.scale, ctx.doc_ids
        size, rank, group, ranks = pctx.cp, pctx.cp_rank, pctx.groups["cp"], pctx.groups["cp_ranks"]
        heads, groups, s_local = q.shape[1], k.shape[1], q.shape[2]
        q_pos = cp_positions(s_local * size, size, rank, device=q.device)
        dout = grad_out.float()
        out_q = out.to(q.dtype)  # what the fused kernels' backward takes
        delta = None if ctx.fused else (dout * out).sum(dim=-1, keepdim=True)  # (B, h, Sq, 1): explicit blocks
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        travelling = [k, v, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                      torch.zeros(v.shape, dtype=torch.float32, device=v.device)]  # fmt: skip
        for step in range(size):
            kb, vb, dk_acc, dv_acc = travelling
            # the block itself moves on while this rank computes with it; its gradient follows after
            moving = _ring_exchange([kb, vb], group, ranks, rank) if step < size - 1 else None
            source = (rank - step) % size
            if ctx.fused:
                rows, keys, causal = _ring_blocks(rank, source, s_local // 2)
                dq_b, dk_b, dv_b = _block_backward(grad_out[:, :, rows], q[:, :, rows], _expand(kb[:, :, keys], heads),
                                                   _expand(vb[:, :, keys], heads), out_q[:, :, rows],
                                                   lse[:, :, rows].contiguous(), causal, scale, ctx.blocks[step])  # fmt: skip
                dq[:, :, rows] += dq_b.float()
                dk, dv = torch.zeros_like(dk_acc), torch.zeros_like(dv_acc)
                dk[:, :, keys], dv[:, :, keys] = _fold(dk_b.float(), groups), _fold(dv_b.float(), groups)
            else:
                assert delta is not None
                mask = _block_mask(q_pos, cp_positions(s_local * size, size, source, device=q.device), doc_ids)
                ke, ve = _expand(kb, heads).float(), _expand(vb, heads).float()
                probs = torch.exp(_scores(q.float(), ke, mask, scale) - lse.clamp_min(-1e30)[..., None])
                dv = _fold(torch.matmul(probs.transpose(-2, -1), dout), groups)
                ds = probs * (torch.matmul(dout, ve.transpose(-2, -1)) - delta)
                dq += torch.matmul(ds, ke) * scale
                dk = _fold(torch.matmul(ds.transpose(-2, -1), q.float()) * scale, groups)
            travelling = [kb, vb, dk_acc + dk, dv_acc + dv]
            if moving is not None:  # the block's gradient so far on to the next rank, after the block
                grads, requests = _ring_exchange(travelling[2:], group, ranks, rank)
                blocks, block_requests = moving
                for request in [*block_requests, *requests]:
                    request.wait()
                travelling = [*blocks, *grads]
        if size > 1:  # the last holder of each block is the rank before its owner
            (dk_own, dv_own), requests = _ring_exchange(travelling[2:], group, ranks, rank)
            for request in requests:
                request.wait()
        else:
            dk_own, dv_own = travelling[2:]
        return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ParallelContext, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence's keys: (B, nq, S / C, d) and
    K/V (B, g, S / C, d), each rank's two chunks (`cp_positions`) -> (B, nq, S / C, d). `doc_ids`
    (B, S), the whole sequence's document ids: attention stays inside each document."""
    return _RingAttention.apply(q, k, v, ctx, q.shape[-1] ** -0.5, doc_ids)  # type: ignore[no-any-return]


# ---- Ulysses (a2a) ------------------------------------------------------------------------------
class _SequenceToHeads(torch.autograd.Function):
    """Forward: all-to-all over the CP group, (B, h, S / C, d) sequence shards of every head ->
    (B, h / C, S, d) the whole sequence (in position order) of this rank's heads. Backward: the
    inverse all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _to_heads(x, pctx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _to_sequence(grad, ctx.pctx), None


class _HeadsToSequence(torch.autograd.Function):
    """Forward: the inverse of `_SequenceToHeads`. Backward: `_SequenceToHeads`' all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
        ctx.pctx = pctx
        return _to_sequence(x, pctx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _to_heads(grad, ctx.pctx), None


@functools.lru_cache(maxsize=16)
def _orders(seq_length: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the gathered sequence (every rank's two chunks, in rank order) and the
    permutation back to position order: made once per shape, not for each tensor of each layer."""
    order = torch.cat([cp_positions(seq_length, size, r, device=device) for r in range(size)])
    return order, torch.argsort(order)


def _to_heads(x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
    c = pctx.cp
    b, h, s, d = x.shape
    if h % c:
        raise ValueError(f"{h} heads are not divisible by the context-parallel size {c} (Ulysses splits heads)")
    send = x.reshape(b, c, h // c, s, d).transpose(0, 1).contiguous()  # (C, B, h / C, S / C, d): to rank j
    recv = torch.empty_like(send)  # (C, B, h / C, S / C, d): from rank j, its sequence shard
    dist.all_to_all_single(recv, send, group=pctx.groups["cp"])
    gathered = recv.permute(1, 2, 0, 3, 4).reshape(b, h // c, c * s, d)  # sequence in rank-chunk order
    return gathered.index_select(2, _orders(c * s, c, x.device)[1])


def _to_sequence(x: torch.Tensor, pctx: ParallelContext) -> torch.Tensor:
    c = pctx.cp
    b, hc, s_full, d = x.shape
    s = s_full // c
    ordered = x.index_select(2, _orders(s_full, c, x.device)[0])  # back to rank-chunk order
    send = ordered.reshape(b, hc, c, s, d).permute(2, 0, 1, 3, 4).contiguous()  # (C, B, h / C, S / C, d)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=pctx.groups["cp"])
    return recv.transpose(0, 1).reshape(b, c * hc, s, d)  # (B, h, S / C, d)


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ParallelContext,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """Sequence shards -> the whole sequence of H / C heads (queries and K/V groups alike), `attend`
    (any attention over whole sequences: causal SDPA, per document, ...) -> back to sequence shards."""
    heads = [_SequenceToHeads.apply(t, ctx) for t in (q, k, v)]
    return _HeadsToSequence.apply(attend(*heads), ctx)  # type: ignore[no-any-return]
