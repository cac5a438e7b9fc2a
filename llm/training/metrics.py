"""Metrics: one record per log interval to metrics.jsonl, the console, wandb and TensorBoard (rank 0).

TensorBoard tags: `train/<key>` for the step records (loss, lr, grad_norm, tokens_per_sec, ...),
`val/<key>` and `test/<key>` for evaluations, `events/<key>` for everything else (rollbacks,
checkpoint saves, resumes); the iteration is the step. The losses are also written with the number
of tokens trained as the step (Megatron's "vs samples"), under `<tensorboard_dir>/by_tokens` (a run
of its own in TensorBoard: one event file must not mix step scales, or a resume's purge of
retrained steps would hit the other). The effective config is the text `config`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from llm.config import Config
from llm.progress import format_duration

logger = logging.getLogger("llm")


def _wandb_mode(cfg: Config) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    mode = cfg.logging.wandb_mode
    if mode != "auto":
        return mode
    if cfg.logging.wandb_project is None:
        return "disabled"
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    )
    return "online" if logged_in else "offline"


class MetricsLogger:
    """Writes records on rank 0 only; other ranks hold a no-op instance."""

    def __init__(
        self, cfg: Config, *, enabled: bool, run_id: str | None = None, start: tuple[int, int] = (0, 0)
    ) -> None:
        """`start`: the (iteration, consumed samples) this process starts from (a resume's)."""
        self.enabled = enabled
        self.cfg = cfg
        self.wandb_run: Any = None
        self.tensorboard: Any = None
        self.tensorboard_tokens: Any = None
        self.start = time.time()
        self.tokens_seen = start[1] * cfg.model.seq_length
        if not enabled:
            return
        directory = Path(cfg.logging.dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.jsonl"
        mode = _wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.logging.wandb_project or "llm",
                entity=cfg.logging.wandb_entity,
                name=cfg.logging.wandb_name,
                dir=str(directory),
                mode=mode,  # type: ignore[arg-type]
                config=cfg.to_dict(),
                id=run_id,
                resume="allow" if run_id else None,
            )
        self._open_tensorboard(start[0])

    def _open_tensorboard(self, start_iteration: int) -> None:
        """Event files in logging.tensorboard_dir; on a resume, events an earlier run wrote after the
        resume point (steps this run trains again) are hidden (TensorBoard's purge_step)."""
        directory = self.cfg.logging.tensorboard_dir
        if directory is None:
            return
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(
            directory, purge_step=start_iteration + 1 if start_iteration else None
        )
        self.tensorboard_tokens = SummaryWriter(
            str(Path(directory) / "by_tokens"), purge_step=self.tokens_seen + 1 if start_iteration else None
        )
        if not start_iteration:
            text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            self.tensorboard.add_text("config", "```\n" + text + "```", 0)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        step = int(record["iteration"])
        if "consumed_samples" in record:
            self.tokens_seen = int(record["consumed_samples"]) * self.cfg.model.seq_length
        group = "train" if "loss" in record else "events"
        for key, value in record.items():
            if (
                key in ("iteration", "consumed_samples")
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            tag = key if key.startswith("lm_eval/") else f"{group}/{key}"
            for split in ("val", "test"):
                if key.startswith(f"{split}_"):
                    tag = f"{split}/{key[len(split) + 1 :]}"
            self.tensorboard.add_scalar(tag, value, step)
            if tag.endswith("/loss"):
                self.tensorboard_tokens.add_scalar(f"{tag} vs tokens", value, self.tokens_seen)
        self.tensorboard.flush()
        self.tensorboard_tokens.flush()

    @property
    def wandb_run_id(self) -> str | None:
        return None if self.wandb_run is None else str(self.wandb_run.id)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb_run is not None:
            step = int(record["iteration"])
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
            self.wandb_run.log(numbers, step=step)  # events' paths and ranges stay in metrics.jsonl
        if self.tensorboard is not None:
            self._tensorboard(clean)

    def console(self, record: dict[str, Any], total_iters: int) -> None:
        if not self.enabled:
            return
        it = int(record["iteration"])
        if "val_loss" in record:
            logger.info(
                "eval   %6d/%d | val_loss %.4f | val_ppl %.2f",
                it,
                total_iters,
                record["val_loss"],
                record["val_ppl"],
            )
            return
        eta = (total_iters - it) * record.get("step_time", 0.0)
        extra = ""
        if record.get("mfu") is not None:
            extra = f" | {record['tflops_per_gpu']:.1f} TFLOP/s/gpu | mfu {100 * record['mfu']:.1f}%"
        if record.get("moe_load_balancing_loss") is not None:  # compact: the per-layer values are in the files
            extra += f" | moe lb {record['moe_load_balancing_loss']:.3f} imb {record['moe_load_imbalance']:.2f}"
            if record.get("moe_dropped_fraction"):
                extra += f" drop {100 * record['moe_dropped_fraction']:.1f}%"
        if record.get("peak_memory_gb") is not None:
            extra += f" | peak mem {record['peak_memory_gb']:.2f} GB"
        logger.info(
            "iter   %6d/%d (%3.0f%%) | loss %.4f | lr %.3e | grad_norm %.3f | %s tok/s | %.3f s/it%s | eta %s",
            it,
            total_iters,
            100.0 * it / total_iters,
            record["loss"],
            record["lr"],
            record.get("grad_norm") or 0.0,
            f"{record['tokens_per_sec']:,.0f}",
            record["step_time"],
            extra,
            format_duration(eta),
        )

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard_tokens.close()
