"""The step profiler's arithmetic: the device's busy time is the union of its kernels' intervals."""

from __future__ import annotations

from types import SimpleNamespace

from llm.training.profile import _device_busy_us, _is_collective


def _kernel(start: float, end: float) -> SimpleNamespace:
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end))


def test_overlapping_and_nested_kernels_count_once_and_gaps_not_at_all() -> None:
    kernels = [_kernel(0, 10), _kernel(5, 15), _kernel(6, 8), _kernel(20, 25), _kernel(25, 26)]
    assert _device_busy_us(kernels) == 15 + 6  # [0, 15] and [20, 26]
    assert _device_busy_us([]) == 0


def test_collectives_are_told_from_compute_by_name() -> None:
    assert _is_collective("ncclDevKernel_AllReduce_Sum_f32_RING_LL")
    assert _is_collective("gloo:all_reduce") and _is_collective("c10d::allgather_")
    assert not _is_collective("aten::mm") and not _is_collective("void cutlass::Kernel<...>")
    assert not _is_collective("aten::broadcast_tensors")  # an elementwise op's helper, not a broadcast
