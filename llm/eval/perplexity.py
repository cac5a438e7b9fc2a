"""Perplexity of a model on a token stream, by one fixed scheme.

The stream: documents tokenized, each followed by EOS, concatenated in order (a `.bin/.idx`
prefix already is such a stream). Window k is t[k*S : k*S + S + 1] (S = seq_length): windows
overlap by one token, so every token but the first is predicted exactly once, with the context
of its own window. The last window may be shorter. Perplexity = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llm.config import DataConfig
from llm.data.sources import InputError, Record, parse_record
from llm.model.gpt import GPT, IGNORE
from llm.model.inputs import model_inputs
from llm.parallel.process_groups import ParallelContext
from llm.progress import Progress


@dataclass
class PerplexityResult:
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def as_dict(self) -> dict[str, float | int]:
        return {"perplexity": self.perplexity, "loss": self.loss, "tokens": self.tokens}


def token_stream(records: Iterable[Record], tokenizer, *, json_key: str = "text") -> np.ndarray:  # type: ignore[no-untyped-def]
    """Documents -> one int64 stream, EOS after each; malformed records are skipped."""
    parts = []
    for record in records:
        text, _ = parse_record(record, json_key)
        if text is not None:
            parts.append(np.asarray([*tokenizer.encode(text), tokenizer.eos_id], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def windows(stream: np.ndarray, seq_length: int) -> Iterator[np.ndarray]:
    """Window k = stream[k*S : k*S + S + 1]; the last may be shorter (at least 2 tokens)."""
    for start in range(0, max(0, len(stream) - 1), seq_length):
        yield stream[start : start + seq_length + 1]


def evaluate_stream(
    model: GPT,
    stream: np.ndarray,
    *,
    seq_length: int,
    batch_size: int = 8,
    ctx: ParallelContext | None = None,
    data: DataConfig | None = None,
) -> PerplexityResult:
    """With a context of several processes, each takes windows k with k % world == rank (a full
    model per process) and the sums are all-reduced: the result equals one process's. `data`: the
    run's data settings, so a model trained document-aware is scored as it trained (positions and
    attention per document, the predictions at EOD not counted with data.eod_mask_loss)."""
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    local_nll, local_count = _local_totals(model, stream, seq_length, batch_size, rank, world, data)
    nll, count = local_nll, float(local_count)
    if ctx is not None and world > 1:
        nll, count = ctx.sum_over_world([nll, count])
    if count == 0:
        raise InputError("the input holds fewer than 2 tokens: nothing to evaluate; pass more text")
    return PerplexityResult(loss=nll / count, tokens=int(count))


@torch.no_grad()
def _local_totals(
    model: GPT,
    stream: np.ndarray,
    seq_length: int,
    batch_size: int,
    rank: int,
    world: int,
    data: DataConfig | None,
) -> tuple[float, int]:
    data = data or DataConfig()  # no settings: plain next-token windows
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    count = 0
    batch: list[np.ndarray] = []
    n_windows = -(-max(0, len(stream) - 1) // seq_length)
    mine = len(range(rank, n_windows, world))
    progress = Progress(mine, "perplexity", unit="windows", enabled=rank == 0)

    def flush() -> None:
        nonlocal total_nll, count
        if not batch:
            return
        progress.update(len(batch))
        tokens = torch.from_numpy(np.stack(batch)).to(device)  # (B, L + 1)
        inputs, labels, *docs = model_inputs(tokens, data)
        assert inputs is not None and labels is not None
        logits = model(inputs, None, *docs).float()  # (B, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=IGNORE)
        total_nll += float(nll)
        count += int((labels != IGNORE).sum())
        batch.clear()

    for k, w in enumerate(windows(stream, seq_length)):
        if k % world != rank:
            continue
        if len(w) != seq_length + 1:
            flush()
        batch.append(np.asarray(w, dtype=np.int64))
        if len(batch) == batch_size or len(w) != seq_length + 1:
            flush()
    flush()
    progress.close()
    return total_nll, count
