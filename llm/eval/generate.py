"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded.

The model sees at most its context (`model.max_positions` tokens). Nothing is cut silently: a
prompt longer than the context is refused unless `truncate_prompt` keeps its last tokens, and
generating past the context is refused unless `sliding_window` keeps predicting from the last
context's worth of tokens (recomputed each token once past it: positions restart, the cache no
longer applies).
"""

from __future__ import annotations

import torch

from llm.errors import LLMError
from llm.model.gpt import GPT
from llm.model.layers import KVCache


class ContextLengthError(LLMError, ValueError):
    """A prompt or a generation that does not fit the model's context, with the way out."""


def fit_context(
    prompt_len: int, max_new_tokens: int, context: int, *, truncate_prompt: bool, sliding_window: bool
) -> tuple[int, list[str]]:
    """How many prompt tokens to drop from the left, and the warnings to show; raises when the
    request does not fit and no flag allows what it would take."""
    if max_new_tokens < 1:
        raise ContextLengthError(f"--max-new-tokens is {max_new_tokens}; ask for at least 1 token")
    warnings: list[str] = []
    drop = 0
    if prompt_len > context and not truncate_prompt:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but the model's context is {context} (model.seq_length); "
            f"shorten it, or pass --truncate-prompt to keep its last tokens"
        )
    if truncate_prompt:  # keep what leaves room for every new token (the last new one is not fed back)
        keep = max(1, min(prompt_len, context - max_new_tokens + 1))
        drop = prompt_len - keep
        if drop:
            warnings.append(
                f"the prompt was truncated from the left to its last {keep} tokens ({drop} dropped) to leave room "
                f"for {max_new_tokens} new tokens in the context of {context}"
            )
    kept = prompt_len - drop
    # The last new token is never fed back: the model sees at most kept + max_new_tokens - 1 tokens.
    needed = kept + max_new_tokens - 1
    if needed > context:
        if not sliding_window:
            room = context - kept + 1
            raise ContextLengthError(
                f"the prompt ({kept} tokens) and --max-new-tokens {max_new_tokens} need {needed} positions but "
                f"the model's context is {context}; lower --max-new-tokens to {room}, or pass --sliding-window "
                f"to keep generating from the last {context} tokens"
            )
        warnings.append(
            f"generating past the context of {context} tokens: from new token {context - kept + 2} on, each "
            f"new token sees only the last {context} tokens (sliding window, recomputed without the KV cache)"
        )
    return drop, warnings


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
    truncate_prompt: bool = False,
    sliding_window: bool = False,
) -> list[int]:
    """Returns the new token ids (stops early at `eos_id`). temperature 0 = greedy. A request that
    does not fit the context raises ContextLengthError unless a flag allows it (see `fit_context`)."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.cfg.max_positions
    prompt = prompt or [eos_id or 0]
    drop, _ = fit_context(len(prompt), max_new_tokens, limit, truncate_prompt=truncate_prompt,
                          sliding_window=sliding_window)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt[drop:]], device=device)  # (1, P)
    caches = _empty_caches(model, 1, device, next(model.parameters()).dtype) if use_cache else None
    offset = 0
    step_input = ids
    out: list[int] = []
    for _ in range(max_new_tokens):
        if ids.shape[1] > limit:  # only with sliding_window: the window moves, the cache restarts
            ids = ids[:, -limit:]
            step_input, offset = ids, 0
            caches = _empty_caches(model, 1, device, next(model.parameters()).dtype) if use_cache else None
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
