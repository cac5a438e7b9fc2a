"""Resuming: the one path from a checkpoint back into a running engine, taken at the start of a run
(checkpoint.resume) and by a rollback after a loss spike.

`resume(...)` chooses the newest checkpoint that verifies on every rank (or the one named), checks
that the data is what it was trained on (data.allow_changed_data), loads the engine (resharding at
another layout) and DiLoCo's outer state, and puts the run's optimizer settings and LR schedule
back on top of the loaded ones. The caller restores the random streams it returns when nothing else
will draw from them (`Steps.restore_rng`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.checkpoint.engine import choose_verified
from llm.checkpoint.format import CheckpointError, complete_tags, latest_tag, read_meta
from llm.config import Config, ConfigError, TrainConfig
from llm.data.identity import identity_differences
from llm.engine.internals import torch_optimizer
from llm.errors import on_every_rank
from llm.parallel.process_groups import ParallelContext
from llm.training.diloco import DiLoCo
from llm.training.lr_schedule import lr_at
from llm.training.muon import muon_lr_scale
from llm.training.state import TrainState
from llm.training.steps import Steps


@dataclass
class ResumePoint:
    tag_dir: Path  # the checkpoint loaded
    state: TrainState  # as saved
    rng_state: Any  # this rank's random streams as saved (None: the checkpoint has none for it)
    changes: list[str]  # settings and data that differ from the checkpoint's, as `train.lr: 0.0003 -> 0.0001`


def resume_source(cfg: Config) -> str | None:
    """Where checkpoint.resume points: a checkpoint directory (or a checkpoint in it), or None."""
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    if mode == "auto":
        found = latest_tag(cfg.checkpoint_dir) or complete_tags(Path(cfg.checkpoint_dir))
        return cfg.checkpoint_dir if found else None
    if not Path(mode).exists():
        raise ConfigError(
            f"checkpoint.resume = '{mode}' does not exist; use auto, none or a checkpoint directory"
        )
    return mode


def resume(
    steps: Steps, source: str | Path, cfg: Config, ctx: ParallelContext, *, fallback: bool,
    tokenizer_fingerprint: str | None, data_identity: dict[str, Any], diloco: DiLoCo | None,
) -> ResumePoint:  # fmt: skip
    """Loads the checkpoint at `source` (`fallback`: a damaged newest one gives way to the newest that
    verifies) into the engine and DiLoCo's outer state; the optimizer and LR schedule then follow the
    run's config, not the saved one (`apply_optimizer_settings`)."""
    tag_dir = choose_verified(source, ctx, fallback=fallback, checksums=cfg.checkpoint.verify)
    data_changes = _data_changes(cfg, tag_dir, data_identity)  # before the (long) load
    saved = steps.load(tag_dir, tokenizer_fingerprint=tokenizer_fingerprint)
    if diloco is not None:
        if "diloco_state" not in saved:
            raise CheckpointError(
                f"checkpoint '{tag_dir}' holds no DiLoCo state for rank {ctx.rank}; use an earlier one"
            )
        try:
            diloco.load_state_dict(saved["diloco_state"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint '{tag_dir}': {e}") from None
    apply_optimizer_settings(steps.engine, cfg)
    changes = changed_settings(saved.get("config", {}), cfg) + data_changes
    state = TrainState.from_saved(saved)
    if Path(tag_dir).resolve().parent != Path(cfg.checkpoint_dir).resolve():
        # another run's checkpoint (a cool-down branch, a fine-tune): this run is its own in wandb
        state.wandb_run_id = None
    return ResumePoint(tag_dir, state, saved.get("rng_state"), changes)


# Sections whose changes a resume reports (model changes are refused by the checkpoint layer).
_REPORTED = ("train", "eval", "logging", "checkpoint", "data", "parallel")


def changed_settings(saved: dict[str, Any], cfg: Config) -> list[str]:
    ours = cfg.to_dict()
    out = []
    for section in _REPORTED:
        before, after = saved.get(section, {}), ours[section]
        for key, value in after.items():
            if key in before and before[key] != value:
                out.append(f"{section}.{key}: {before[key]!r} -> {value!r}")
    return out


def apply_optimizer_settings(engine: Any, cfg: Config) -> None:
    """The run's learning-rate schedule and AdamW settings from the resume point on (as Megatron's
    --override-opt_param-scheduler): loading a checkpoint restores the saved ones with the optimizer
    and scheduler state, which would silently keep the old lr, decay, betas and eps."""
    t = cfg.train
    scheduler = engine.lr_scheduler
    groups = torch_optimizer(engine).param_groups
    base = t.lr if t.lr > 0 else 1.0
    step = int(getattr(scheduler, "last_epoch", 0))  # steps taken: the next one's 0-based index
    for i, group in enumerate(groups):
        scale = _lr_scale(group, t)
        group.update(initial_lr=base * scale, lr=lr_at(step, t) * scale, betas=(t.adam_beta1, t.adam_beta2),
                     eps=t.adam_eps)  # fmt: skip
        if "use_muon" in group:  # muon_parameter_groups(): [Muon matrices, decayed matrices, no decay]
            group.update(momentum=t.muon_momentum, nesterov=t.muon_nesterov, ns_steps=t.muon_ns_steps)
        if len(groups) == 2 or "use_muon" in group:  # parameter_groups(): [decayed matrices, no decay]
            group["weight_decay"] = t.weight_decay if i < len(groups) - 1 else 0.0
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [base * _lr_scale(g, t) for g in groups]


def _lr_scale(group: dict[str, Any], t: TrainConfig) -> float:
    """A group's rate relative to train.lr, from the run's settings (not the saved ones)."""
    return muon_lr_scale(t) if group.get("use_muon") else 1.0


class DataChangedError(ConfigError):
    """A resume on other data than the checkpoint was trained on (data.allow_changed_data: false)."""


def _data_changes(cfg: Config, tag_dir: Path, identity: dict[str, Any]) -> list[str]:
    """How the data differs from the checkpoint's (`data: ...` entries for the resume changes);
    refused unless data.allow_changed_data. A checkpoint written before data identities: nothing."""
    saved = read_meta(tag_dir).get("data_identity")
    diffs = identity_differences(saved, identity) if saved else []
    if diffs and not cfg.data.allow_changed_data:
        raise on_every_rank(DataChangedError(
            f"the data differs from what checkpoint '{tag_dir}' was trained on: {'; '.join(diffs)}. The data order "
            "after the resume would not be the run's: resume with the same data, or set data.allow_changed_data=true "
            "to train on with this data (recorded as a resume change)"
        ))  # fmt: skip
    return [f"data: {d}" for d in diffs]
