"""Cross-entropy over vocabulary-sharded logits, without gathering the full logits on any rank.

Each rank holds logits for vocabulary ids [start, start + V/tp). Padded ids (>= the real
vocabulary size) are masked to -inf first, so they take no probability mass. Collectives: one
all-reduce MAX (stability), two all-reduce SUMs (the target logit and the softmax denominator) of
shape (N,) in forward; backward is local (softmax minus one-hot on this rank's columns).
"""

from __future__ import annotations

from typing import Any

import torch

from llm.parallel.mappings import all_reduce_max, all_reduce_sum
from llm.parallel.process_groups import ParallelContext


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        pctx: ParallelContext,
        vocab_start: int,
        vocab_size: int,
    ) -> torch.Tensor:
        # logits: (N, V / tp) float32; target: (N,)
        local = logits.shape[-1]
        ids = torch.arange(vocab_start, vocab_start + local, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
        local_target, outside = _local_targets(target, vocab_start, local)
        shifted, _, target_logit = _shifted(logits, local_target, outside, pctx)  # (N, V / tp), (N,)
        exp = shifted.exp()
        sum_exp = all_reduce_sum(exp.sum(dim=-1), pctx)  # (N,)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, outside)
        return sum_exp.log() - target_logit  # (N,) per-token loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        softmax, local_target, outside = ctx.saved_tensors
        g = _minus_one_hot(softmax.clone(), local_target, outside)
        return g * grad.unsqueeze(-1), None, None, None, None


def _local_targets(target: torch.Tensor, vocab_start: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids as columns of this rank's shard [vocab_start, vocab_start + local) (0 where outside),
    and which targets lie outside it."""
    outside = (target < vocab_start) | (target >= vocab_start + local)
    return (target - vocab_start).masked_fill(outside, 0), outside


def _shifted(
    logits: torch.Tensor, local_target: torch.Tensor, outside: torch.Tensor, pctx: ParallelContext
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local logits minus each row's maximum over the whole vocabulary (all-reduce MAX), that maximum,
    and each row's target logit after the shift (all-reduce SUM: one rank holds it)."""
    row_max = all_reduce_max(logits.max(dim=-1).values.detach().clone(), pctx)
    shifted = logits - row_max.unsqueeze(-1)
    target_logit = shifted.gather(1, local_target.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0)
    return shifted, row_max, all_reduce_sum(target_logit.contiguous(), pctx)


def _minus_one_hot(softmax: torch.Tensor, local_target: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """The softmax minus the one-hot of each row's target where this rank holds it (in place): the
    cross-entropy's gradient with respect to the logits."""
    rows = torch.arange(softmax.shape[0], device=softmax.device)
    softmax[rows, local_target] -= (~outside).to(softmax.dtype)
    return softmax


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ctx: ParallelContext, *, vocab_start: int, vocab_size: int
) -> torch.Tensor:
    """Per-token losses (N,) from local logits (N, V/tp) and global target ids (N,)."""
    return _VocabParallelCrossEntropy.apply(logits.float(), target, ctx, vocab_start, vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The LM head and the cross-entropy together, `chunk` tokens at a time: the logits (fp32, this
    rank's vocabulary shard) of one chunk exist at a time, in forward and again in backward, where
    they are recomputed from the hidden states and the saved log-sum-exp. Same collectives as
    `_VocabParallelCrossEntropy`, per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, pctx: ParallelContext,
        vocab_start: int, vocab_size: int, chunk: int,
    ) -> torch.Tensor:  # fmt: skip
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits, local_target, outside = _chunk_logits(hidden[rows], weight, target[rows], vocab_start, vocab_size)
            shifted, row_max, target_logit = _shifted(logits, local_target, outside, pctx)
            log_sum = all_reduce_sum(shifted.exp_().sum(dim=-1), pctx).log_()
            losses[rows] = log_sum - target_logit
            lse[rows] = log_sum + row_max
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.pctx, ctx.vocab, ctx.chunk = pctx, (vocab_start, vocab_size), chunk
        return losses

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, target, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logits, local_target, outside = _chunk_logits(hidden[rows], weight, target[rows], *ctx.vocab)
            g = _minus_one_hot(logits.sub_(lse[rows].unsqueeze(-1)).exp_(), local_target, outside)  # softmax - 1
            g.mul_(grad[rows].unsqueeze(-1))
            g_low = g.to(weight.dtype)  # the matmuls in the weights' precision (bf16 on a GPU), as F.linear's
            grad_hidden[rows] = (g_low @ weight).to(hidden.dtype)
            grad_weight += (g_low.t() @ hidden[rows].to(weight.dtype)).float()  # summed over chunks in fp32
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's local logits (fp32, padded ids at -inf), its targets as local columns, and which
    targets lie outside this rank's shard."""
    local = weight.shape[0]
    logits = (hidden @ weight.t()).float()
    if vocab_start + local > vocab_size:  # padded ids take no probability mass
        logits[:, max(vocab_size - vocab_start, 0):] = float("-inf")
    return (logits, *_local_targets(target, vocab_start, local))


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ctx: ParallelContext, *,
    vocab_start: int, vocab_size: int, chunk: int,
) -> torch.Tensor:  # fmt: skip
    """Per-token losses (N,) of hidden states (N, H) under this rank's output rows (V_padded / tp, H) for
    global target ids (N,), without the (N, V) logits: `chunk` tokens' logits at a time
    (model.loss_chunk_tokens). The same values and gradients as the LM head followed by
    `vocab_parallel_cross_entropy` (or F.cross_entropy at TP 1)."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, target, ctx, vocab_start, vocab_size, chunk)  # type: ignore[no-any-return]
