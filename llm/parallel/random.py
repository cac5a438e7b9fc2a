"""Tensor-parallel-aware random numbers.

Two streams per process:
- the default generator, seeded identically on every tensor-parallel rank: dropout on replicated
  activations (the residual stream without sequence parallelism) draws the same mask everywhere,
  as the single-process model would;
- the tracked "model-parallel" stream, seeded per tensor-parallel rank: dropout on sharded
  activations (attention heads, sequence-parallel regions) draws independent masks.

`fork()` swaps the tracked state into the default generator for the duration of a block, so
code inside (including `F.scaled_dot_product_attention`'s dropout) needs no generator argument.
States are saved in checkpoints and restored during activation-checkpoint recomputation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

MODEL_PARALLEL_SEED_OFFSET = 2718


def _get_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.device = "cpu"

    def seed(self, *, seed: int, tp_rank: int, pp_rank: int, device: str) -> None:
        """Seeds the default generator (same on all TP ranks) and the model-parallel stream (per TP rank)."""
        self.device = device
        base = seed + 100 * pp_rank
        torch.manual_seed(base + MODEL_PARALLEL_SEED_OFFSET + tp_rank)  # seeds CPU and CUDA generators
        self.states["model-parallel"] = _get_state(device)
        torch.manual_seed(base)

    @contextmanager
    def fork(self, name: str = "model-parallel") -> Iterator[None]:
        if name not in self.states:  # unseeded (a single process): the default stream
            yield
            return
        outer = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(outer, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, Any]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}


def checkpoint_context_fn(
    tracker: RNGTracker,
) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """For `torch.utils.checkpoint(context_fn=...)`: recomputation sees the tracked states of the
    original forward, so dropout masks in sharded regions are redrawn identically."""
    snapshot: dict[str, torch.Tensor] = {}

    @contextmanager
    def forward() -> Iterator[None]:
        snapshot.update(tracker.get_states())
        yield

    @contextmanager
    def recompute() -> Iterator[None]:
        current = tracker.get_states()
        tracker.set_states(snapshot)
        try:
            yield
        finally:
            tracker.set_states(current)

    return forward(), recompute()
