"""Every random stream of a process, saved per rank and restored right before the first step."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state(tracker: Any) -> dict[str, Any]:
    """Every random stream of this process: python, numpy, torch (CPU, CUDA), the TP tracker."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tracker.get_states() if tracker is not None else {},
    }


def restore_rng_state(state: dict[str, Any], tracker: Any) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and state.get("tracker"):
        tracker.set_states(state["tracker"])
