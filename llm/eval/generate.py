"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch

from llm.model.gpt import GPT
from llm.model.layers import KVCache


def _filter(logits: torch.Tensor, *, top_k: int | None, top_p: float | None) -> torch.Tensor:
    # logits: (B, V)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _empty_caches(model: GPT, batch: int, device: torch.device, dtype: torch.dtype) -> list[KVCache]:
    cfg = model.cfg
    shape = (batch, cfg.kv_groups, 0, cfg.head_dim)
    return [
        (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
    ] * len(model.layers)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Returns the new token ids (stops early at `eos_id`). temperature 0 = greedy."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.cfg.max_positions
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt[-limit + 1 :] or [eos_id or 0]], device=device)  # (1, P)
    caches = _empty_caches(model, 1, device, next(model.parameters()).dtype) if use_cache else None
    offset = 0
    step_input = ids
    out: list[int] = []
    for _ in range(max_new_tokens):
        if ids.shape[1] >= limit:
            break
        if use_cache:
            hidden, caches = model.hidden_states(step_input, offset=offset, caches=caches)
            offset += step_input.shape[1]
        else:
            hidden, _ = model.hidden_states(ids)
        logits = model.logits(hidden[:, -1]).float()  # (1, V)
        if temperature <= 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(_filter(logits / temperature, top_k=top_k, top_p=top_p), dim=-1)
            next_id = torch.multinomial(probs, 1, generator=gen)
        token = int(next_id)
        out.append(token)
        if eos_id is not None and token == eos_id:
            break
        ids = torch.cat([ids, next_id], dim=1)
        step_input = next_id
    return out
