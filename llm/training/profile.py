"""Where a training step's time goes: torch.profiler over a few steps, summarised to a small table.

`logging.profile_step_start` / `logging.profile_step_end` (Megatron's --profile-step-start/-end)
profile the steps that make those iterations (inclusive) on the ranks `logging.profile_ranks`, and
write to `<logging.dir>/profile/`:

    trace_rank00000.json     the Chrome trace (chrome://tracing, Perfetto)
    summary_rank00000.txt    the table below, also logged

The table splits one step (the mean over the profiled steps) into what llm's steps annotate
(`STEP_PARTS`: data, forward, backward, the wait for an asynchronous save's host copy, optimizer
step; under pipeline parallelism the whole schedule is one part), the collectives inside them (NCCL
kernels on a GPU, gloo calls on CPU), and the rest of the wall time. On a GPU each part shows its host time (what the Python thread spent)
and its device time (the kernels it launched), and the device's idle time: the wall time no kernel
ran, which is what host overhead and synchronisations cost a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("llm")

# The ranges Steps opens while a profiler runs (llm.training.steps), in the table's order.
# checkpoint_copy_wait: the optimizer step waiting for an asynchronous save's host copy (present only then).
STEP_PARTS = ("llm/data", "llm/forward", "llm/backward", "llm/checkpoint_copy_wait", "llm/optimizer_step",
              "llm/pipeline_schedule")  # fmt: skip


_NOTHING = contextlib.nullcontext()


def step_part(name: str, on: bool) -> contextlib.AbstractContextManager[Any]:
    """A profiler range named `name` while profiling (`on`); otherwise one shared context that does
    nothing (a range, or a generator-made context, costs microseconds of host time per call on the
    step's hot path: not paid by unprofiled steps)."""
    return torch.profiler.record_function(name) if on else _NOTHING


class StepProfiler:
    """Profiles iterations [start, end] of this rank (1-based: the iteration a step completes)."""

    def __init__(self, start: int | None, end: int | None, *, rank: int, ranks: list[int], out_dir: Path) -> None:
        self.start, self.end = start, end
        self.enabled = start is not None and end is not None and rank in ranks
        self.rank, self.out_dir = rank, out_dir
        self._prof: Any = None
        self._wall = 0.0
        self._steps = 0
        self._began = 0.0

    @property
    def active(self) -> bool:
        return self._prof is not None

    def before_step(self, iteration: int) -> None:
        """Called before the step that completes `iteration`."""
        if not self.enabled or self.active or not (self.start or 0) <= iteration <= (self.end or 0):
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self._prof.__enter__()

    def step_began(self) -> None:
        if self.active:
            _synchronize()
            self._began = time.perf_counter()

    def after_step(self, iteration: int) -> None:
        """Called after the step that completed `iteration`; writes the results after the last one."""
        if not self.active:
            return
        _synchronize()
        self._wall += time.perf_counter() - self._began
        self._steps += 1
        if iteration < (self.end or 0):
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace_rank{self.rank:05d}.json"
        prof.export_chrome_trace(str(trace))
        table = summarize(prof, steps=self._steps, wall_seconds=self._wall)
        (self.out_dir / f"summary_rank{self.rank:05d}.txt").write_text(table + "\n")
        logger.info("profile of iterations %s-%s (rank %d), trace %s:\n%s", self.start, self.end, self.rank, trace, table)


def _synchronize() -> None:
    """The device's queue drained, so that a step's wall time is its own (profiled steps only)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _is_collective(name: str) -> bool:
    """torch.distributed's ops (c10d::allreduce_, ...), gloo's and NCCL's own ranges and kernels."""
    low = name.lower()
    return low.startswith("c10d::") or "gloo" in low or "nccl" in low


def _device_busy_us(events: list[Any]) -> float:
    """The time at least one kernel ran: the union of the kernels' intervals (microseconds)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def summarize(prof: Any, *, steps: int, wall_seconds: float) -> str:
    """The per-step table of a finished profile (times in ms per step)."""
    averages = {a.key: a for a in prof.key_averages()}
    cuda = torch.cuda.is_available()
    wall_ms = 1e3 * wall_seconds / max(steps, 1)
    rows: list[tuple[str, float, float | None]] = []
    host_parts = 0.0
    for name in STEP_PARTS:
        a = averages.get(name)
        if a is None:
            continue
        host = a.cpu_time_total / 1e3 / steps
        device = getattr(a, "device_time_total", getattr(a, "cuda_time_total", 0.0)) / 1e3 / steps if cuda else None
        rows.append((name.removeprefix("llm/"), host, device))
        host_parts += host
    if cuda:
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        comm = sum(e.time_range.elapsed_us() for e in kernels if _is_collective(e.name)) / 1e3 / steps
        busy = _device_busy_us(kernels) / 1e3 / steps
        comm_row: tuple[str, float, float | None] = ("  of which collectives", float("nan"), comm)
    else:
        comm = sum(a.self_cpu_time_total for k, a in averages.items() if _is_collective(k)) / 1e3 / steps
        comm_row = ("  of which collectives", comm, None)
    rows.append(comm_row)
    rows.append(("outside these parts", max(wall_ms - host_parts, 0.0), None))
    rows.append(("step (wall)", wall_ms, None))
    if cuda:
        rows.append(("device busy", float("nan"), busy))
        rows.append(("device idle (wall - busy)", float("nan"), max(wall_ms - busy, 0.0)))
    width = max(len(label) for label, _, _ in rows)

    def line(label: str, host: float, device: float | None) -> str:
        h = "" if host != host else f"{host:10.2f}"  # nan: not measured
        return f"{label:<{width}} {h:>10}" + ("" if device is None else f" {device:10.2f}")

    head = f"one step, mean of {steps} (ms)" + (" host / device" if cuda else " host")
    return "\n".join([head, "", *(line(*r) for r in rows)])
