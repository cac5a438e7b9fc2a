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
        row_max = all_reduce_max(logits.max(dim=-1).values.detach().clone(), pctx)
        shifted = logits - row_max.unsqueeze(-1)  # (N, V / tp)
        outside = (target < vocab_start) | (target >= vocab_start + local)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        target_logit = shifted.gather(1, local_target.unsqueeze(1)).squeeze(1).masked_fill(outside, 0.0)
        target_logit = all_reduce_sum(target_logit.contiguous(), pctx)
        exp = shifted.exp()
        sum_exp = all_reduce_sum(exp.sum(dim=-1), pctx)  # (N,)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, outside)
        return sum_exp.log() - target_logit  # (N,) per-token loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        softmax, local_target, outside = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, local_target] -= (~outside).to(g.dtype)
        return g * grad.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ctx: ParallelContext, *, vocab_start: int, vocab_size: int
) -> torch.Tensor:
    """Per-token losses (N,) from local logits (N, V/tp) and global target ids (N,)."""
    return _VocabParallelCrossEntropy.apply(logits.float(), target, ctx, vocab_start, vocab_size)
