"""The row order of the fused QKV projection, defined once for the model, the tensor-parallel
layers, checkpoint merging and the Hugging Face mapping.

`attention.qkv.weight` has (heads + 2 groups) x head_dim rows (the bias as many entries), grouped
by KV group: for each group g the rows are [the heads / groups query heads of g | k_g | v_g], each
head `head_dim` rows. Query head i belongs to group i // (heads / groups), as in grouped-query
attention everywhere. Splitting along this dimension at a multiple of one group's rows gives each
tensor-parallel rank whole groups without reordering. The same functions apply to activations,
whose last dimension has this order.
"""

from __future__ import annotations

import torch


def qkv_blocks(x: torch.Tensor, *, heads: int, groups: int, head_dim: int, dim: int = 0) -> torch.Tensor:
    """`x` with dimension `dim` ((heads + 2 groups) x head_dim) viewed as (groups, heads / groups + 2, head_dim)."""
    return x.unflatten(dim % x.ndim, (groups, heads // groups + 2, head_dim))


def split_qkv(
    x: torch.Tensor, *, heads: int, groups: int, head_dim: int, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q (.., heads, head_dim, ..), k and v (.., groups, head_dim, ..) in head order; k and v are views."""
    d = dim % x.ndim
    per = heads // groups
    blocks = qkv_blocks(x, heads=heads, groups=groups, head_dim=head_dim, dim=d)  # (.., g, per + 2, d, ..)
    q = blocks.narrow(d + 1, 0, per).flatten(d, d + 1)  # (.., heads, d, ..)
    return q, blocks.select(d + 1, per), blocks.select(d + 1, per + 1)


def join_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, groups: int, head_dim: int, dim: int = 0
) -> torch.Tensor:
    """The inverse of `split_qkv` for flat parts: q (heads x head_dim rows), k and v (groups x head_dim)."""
    d = dim % q.ndim
    per = heads // groups
    parts = [
        q.unflatten(d, (groups, per, head_dim)),
        k.unflatten(d, (groups, 1, head_dim)),
        v.unflatten(d, (groups, 1, head_dim)),
    ]
    return torch.cat(parts, dim=d + 1).flatten(d, d + 2)
