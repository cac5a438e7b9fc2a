"""What a run knows about itself between steps, saved in every checkpoint's meta."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    wandb_run_id: str | None = None
    stopped_by: str | None = None  # set when a run stops before train_iters (signal, exit_interval)
    skipped_samples: int = 0  # skipped in total by loss-spike rollbacks
    rollbacks: int = 0
    data_identity: dict[str, Any] | None = None  # what the run trains on (llm.data.identity)
    spike_history: list[float] = field(default_factory=list)  # the spike detector's window at the save

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved (its meta, or the engine's client state)."""
        return cls(
            iteration=int(saved["iteration"]), consumed_samples=int(saved["consumed_samples"]),
            wandb_run_id=saved.get("wandb_run_id"), skipped_samples=int(saved.get("skipped_samples", 0)),
            rollbacks=int(saved.get("rollbacks", 0)), data_identity=saved.get("data_identity"),
            spike_history=[float(x) for x in saved.get("spike_history", [])],
        )  # fmt: skip
