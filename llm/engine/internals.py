"""Every read or write of a DeepSpeed engine's private internals, behind the tested-version guard.

DeepSpeed's public engine API has no call for: the names of the files a save writes, the order in
which an optimizer holds its parameters, the fp32 master copies beside the module's parameters,
ZeRO's fp32 partitions and their per-parameter fragments, creating AdamW's state before the first
step, the step counters, the writer a save goes through, or a call before the pipeline engine's
optimizer step (nor has torch a public name for a storage's identity as torch.save sees it).
Checkpoints (`llm.checkpoint.engine`, `llm.checkpoint.reshard`), DiLoCo's outer step
(`llm.training.diloco`) and the training steps (`llm.training.steps`) need each of them; they ask
here. These attributes change between DeepSpeed releases without notice: importing this module with
an untested version fails at once (`compat.py`), and nothing outside `llm/engine/` reads them
(tests/unit/test_layering.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from llm.engine.compat import require_tested_deepspeed

require_tested_deepspeed()


def torch_optimizer(engine: Any) -> Any:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO and mixed precision hold it as `.optimizer`)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def checkpoint_file_names(
    engine: Any, root: Path, tag: str, *, zero_files: bool, ep_rank: int | None = None
) -> tuple[str, str | None]:
    """The names of this rank's model-states file and optimizer-states file in a save of `tag` under
    `root`: ZeRO 1-3's, or at ZeRO 0 with expert parallelism (`ep_rank`) the file of that
    expert-parallel rank's optimizer (DeepSpeed's MoE save); else None (it is in the model file)."""
    model = Path(engine._get_ckpt_name(str(root), tag)).name
    if zero_files:
        return model, Path(engine._get_zero_ckpt_name(str(root), tag)).name
    if ep_rank is not None:
        return model, Path(engine._get_optimizer_ckpt_name(str(root), tag, ep_rank)).name
    return model, None


def optimizer_parameter_order(engine: Any) -> list[list[torch.nn.Parameter]]:
    """The module's parameters in the order the optimizer's state dict counts them (ZeRO 0). DeepSpeed's
    unfused mixed-precision wrapper (bf16 at ZeRO 0) keeps them in `fp16_groups`, in the order of its
    fp32 masters and of the torch optimizer's state; otherwise the optimizer's own groups."""
    held = getattr(engine.optimizer, "fp16_groups", None)
    return [list(g) for g in held] if held else [list(g["params"]) for g in engine.optimizer.param_groups]


def fp32_masters(engine: Any) -> dict[int, torch.Tensor]:
    """id(module parameter) -> its fp32 master copy under DeepSpeed's unfused mixed-precision wrapper
    (bf16 at ZeRO 0); empty where the optimizer steps the module's parameters themselves."""
    opt = engine.optimizer
    held, masters = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if not held or not masters:
        return {}
    return {id(p): m for g, mg in zip(held, masters) for p, m in zip(g, mg)}


def undo_unfused_optimizer_init_step(engine: Any) -> None:
    """DeepSpeed's unfused mixed-precision wrapper (`FP16_UnfusedOptimizer`: bf16, or fp16, at ZeRO 0
    outside pipelines) creates its inner optimizer's state by taking one step on zero gradients when it
    is built (`initialize_optimizer_states`). For AdamW that step is not harmless: its step count starts
    at 1, so the first real update is 0.73x the one of fp32 training or of ZeRO 1 at beta2 0.95 and
    every later bias correction lags a step; and its decoupled weight decay shrinks the fp32 masters
    once. Undone here, before training or a resume: the state goes (torch optimizers create it at
    their first step) and each master is its module weight again (the value DeepSpeed copied it
    from). Nothing to do under any other wrapper."""
    opt = engine.optimizer
    if type(opt).__name__ != "FP16_UnfusedOptimizer":
        return
    opt.optimizer.state.clear()
    with torch.no_grad():
        for held, masters in zip(opt.fp16_groups, opt.fp32_groups):
            for p, master in zip(held, masters):
                master.copy_(p)


def create_flat_optimizer_state(engine: Any, step: float, keys: tuple[str, ...]) -> None:
    """ZeRO 1-3 create AdamW's state at the first step; create it now (zeros under `keys`) and link
    DeepSpeed's per-parameter fragment views to it, so the fragment API (`zero.py`) can fill it."""
    opt = torch_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO 3 swaps param_groups
    for flat in flats or [p for group in opt.param_groups for p in group["params"]]:
        if any(k not in opt.state.get(flat, {}) for k in keys):
            opt.state[flat] = {"step": torch.tensor(step), **{k: torch.zeros_like(flat) for k in keys}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2 (stage 3 looks the state up on every call)
        link()


def set_step_counters(engine: Any, *, global_steps: int, global_samples: int) -> None:
    """The engine's own step and sample counters (a resume that did not go through its loader)."""
    engine.global_steps = global_steps
    engine.global_samples = global_samples


def partitioned_fp32_masters(
    engine: Any,
) -> tuple[list[tuple[torch.nn.Parameter, torch.Tensor]], Callable[[], None]] | None:
    """Where the optimizer keeps fp32 masters partitioned over the data-parallel ranks (ZeRO 1/2, and
    bf16 at ZeRO 0): (module parameter, 1-D view of this rank's fragment of its master) for every
    parameter with a fragment here, and the call that refreshes the module's low-precision copies from
    the masters. None where the optimizer steps the module's parameters themselves."""
    opt = engine.optimizer
    if not hasattr(opt, "update_lp_params"):
        return None
    groups = getattr(opt, "bit16_groups", None) or opt.bf16_groups
    pieces = [(p, p._hp_mapping.hp_fragment.data.view(-1))
              for g in groups for p in g if getattr(p, "_hp_mapping", None) is not None]  # fmt: skip
    return pieces, opt.update_lp_params


class KeptFailure:
    """DeepSpeed's checkpoint writer during one save, its files handed to `write` and a failed write
    kept instead of raised.

    A rank whose write raises inside `engine.save_checkpoint` leaves it before DeepSpeed's closing
    barrier, where the other ranks would then wait until the collective timeout (a node-local disk
    full on one node). Kept, the failure lets the rank go through DeepSpeed's barriers like the
    others (writing nothing more); the caller then learns of it from `error` and stops every rank."""

    def __init__(self, inner: Any, write: Callable[[Any, str], None]) -> None:
        self.inner = inner
        self.error: BaseException | None = None
        self.write = write

    def kept(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            self.error = e
            return None

    def save(self, state_dict: Any, path: str) -> Any:
        return self.kept(self.write, state_dict, path)  # llm's writer instead of DeepSpeed's torch.save

    def makedirs(self, path: str, exist_ok: bool = False) -> Any:
        return self.kept(self.inner.makedirs, path, exist_ok=exist_ok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def write_failures_kept(engine: Any, *, write: Callable[[Any, str], None]) -> Iterator[KeptFailure]:
    """The engine's checkpoint writer (every file DeepSpeed writes: model, ZeRO and pipeline layer
    states) and its copy of the zero_to_fp32 scripts wrapped by one KeptFailure for the block.
    `write`: each file goes to write(state dict, path) instead of the writer's torch.save (llm's
    checkpoint writer, or an asynchronous save's host copy, written later)."""
    kept = KeptFailure(engine.checkpoint_engine, write)
    copy_scripts = engine._copy_recovery_script
    engine.checkpoint_engine = kept
    engine._copy_recovery_script = lambda path: kept.kept(copy_scripts, path)
    try:
        yield kept
    finally:
        engine.checkpoint_engine = kept.inner
        del engine._copy_recovery_script  # the class's method again


def zipfile_serialization(engine: Any) -> bool:
    """Whether the engine's checkpoint writer saves in torch's zipfile format (DeepSpeed's
    `checkpoint.serialization` setting; its default is the legacy format): a writer elsewhere
    (checkpoint.background) writes the same bytes with it."""
    return bool(getattr(engine.checkpoint_engine, "zipfile_serialization", False))


def before_pipeline_optimizer_step(engine: Any, hook: Callable[[], None]) -> None:
    """Calls `hook()` each time DeepSpeed's pipeline engine is about to take its optimizer step,
    inside the schedule `train_batch` runs: after the batch's forward and backward passes and
    gradient reductions. The engine runs the schedule's instructions through its class's table of
    them; this engine gets a table of its own with the optimizer step wrapped."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    table = dict(type(engine)._INSTRUCTION_MAP)
    step = table[OptimizerStep]

    def hooked(self: Any, **kwargs: Any) -> Any:
        hook()
        return step(self, **kwargs)

    table[OptimizerStep] = hooked
    engine._INSTRUCTION_MAP = table


def storage_key(storage: Any) -> int:
    """A storage's identity as torch.save tells storages apart (torch's own private `_cdata`, the
    address of the storage it wraps): tensors that share it are written as one record. Data pointers
    are not that: every empty storage has the same one."""
    return int(storage._cdata)


def register_expert_groups(name: str, *, ep: tuple[Any, list[int]], edp: tuple[Any, list[int]]) -> None:
    """Our expert-parallel and expert-data-parallel process groups (group, ranks), under DeepSpeed's
    group name for them (`ep_size_<EP>`), in `deepspeed.utils.groups`' tables: its engine and ZeRO
    look the groups up there by the `group_name` each expert parameter carries. Registering the mesh's
    groups (rather than letting DeepSpeed build its own) keeps one rank layout for every axis."""
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[name], groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep
    groups._EXPERT_DATA_PARALLEL_GROUP[name], groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp
