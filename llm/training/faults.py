"""Loss spikes: detection, and the fault injection that tests the recovery (debug.*).

A spike is a non-finite loss, or a loss above both mean + num_std x std and min_ratio x mean of the
last `window` iterations (train.spike_detection). The trainer answers one by reloading the latest
checkpoint in-process and skipping the global batches from the checkpoint's position through the
spiking one, plus train.skip_batches_on_rollback more (PaLM's and OPT's manual recipe, automated).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from llm.config import DebugConfig, SpikeDetectionConfig


@dataclass(frozen=True)
class Spike:
    loss: float
    threshold: float | None  # None: the loss is not finite

    def describe(self) -> str:
        if self.threshold is None:
            return f"loss is {self.loss}"
        return f"loss {self.loss:.4g} is a spike (threshold {self.threshold:.4g})"


class SpikeDetector:
    """Every rank sees the same (data-parallel averaged) losses, so every rank decides alike."""

    def __init__(self, cfg: SpikeDetectionConfig) -> None:
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=max(cfg.window, 1))

    def threshold(self) -> float | None:
        """The loss above which the next one is a spike (None until the window is full)."""
        if self.cfg.window == 0 or len(self.history) < self.cfg.window:
            return None
        mean = statistics.fmean(self.history)
        std = statistics.pstdev(self.history, mu=mean)
        return max(mean + self.cfg.num_std * std, self.cfg.min_ratio * mean)

    def check(self, loss: float) -> Spike | None:
        """A Spike, or None (and the loss joins the history)."""
        if not math.isfinite(loss):
            return Spike(loss, None)
        limit = self.threshold()
        if limit is not None and loss > limit:
            return Spike(loss, limit)
        self.history.append(loss)
        return None

    def restore(self, history: list[float]) -> None:
        """The window as a checkpoint saved it (its last `window` losses), on resume and rollback."""
        self.history.clear()
        self.history.extend(history)


def injected_loss_factor(cfg: DebugConfig, batch_index: int) -> float | None:
    """The factor debug.inject_loss_spike_at puts on the loss of global batch `batch_index` (0-based:
    the batch iteration batch_index + 1 trains in an uninterrupted run), or None."""
    if batch_index + 1 not in cfg.inject_loss_spike_at:
        return None
    return math.nan if cfg.inject_loss_value == "nan" else 1e8
