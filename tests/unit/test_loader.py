from __future__ import annotations

import pytest

from llm.data.loader import DataConfigError, GlobalBatchSampler, parse_data_path


def _global_order(*, total: int, gbs: int, micro: int, dp: int, consumed: int = 0) -> list[list[int]]:
    """The samples of each step, gathered over all data-parallel ranks (as one step sees them)."""
    samplers = [
        iter(GlobalBatchSampler(total_samples=total, consumed_samples=consumed, micro_batch_size=micro,
                                global_batch_size=gbs, dp_rank=r, dp_size=dp))
        for r in range(dp)
    ]  # fmt: skip
    steps = []
    accum = gbs // (micro * dp)
    for _ in range((total - consumed) // gbs):
        step = []
        for it in samplers:
            for _ in range(accum):
                step.extend(next(it))
        steps.append(sorted(step))
    for it in samplers:
        assert next(it, None) is None
    return steps


def test_global_order_is_independent_of_dp_and_micro_batch() -> None:
    reference = _global_order(total=96, gbs=16, micro=16, dp=1)
    assert reference == [list(range(s, s + 16)) for s in range(0, 96, 16)]
    for dp, micro in [(1, 4), (2, 2), (2, 8), (4, 1), (4, 4)]:
        assert _global_order(total=96, gbs=16, micro=micro, dp=dp) == reference


def test_resume_at_another_layout_continues_exactly() -> None:
    reference = _global_order(total=160, gbs=16, micro=2, dp=2)
    for consumed in (16, 48, 144):
        for dp, micro in [(1, 16), (4, 2), (2, 4)]:
            resumed = _global_order(total=160, gbs=16, micro=micro, dp=dp, consumed=consumed)
            assert resumed == reference[consumed // 16 :]


def test_each_rank_takes_a_disjoint_slice() -> None:
    s = [list(GlobalBatchSampler(total_samples=32, consumed_samples=0, micro_batch_size=2, global_batch_size=8,
                                 dp_rank=r, dp_size=2)) for r in range(2)]  # fmt: skip
    flat = [set(i for b in batches for i in b) for batches in s]
    assert not flat[0] & flat[1] and flat[0] | flat[1] == set(range(32))
    assert s[0][:2] == [[0, 1], [2, 3]] and s[1][:2] == [[4, 5], [6, 7]]


def test_parse_data_path() -> None:
    assert parse_data_path("data/a", "k") == [(1.0, "data/a")]
    assert parse_data_path("0.3 a 0.7 b", "k") == [(0.3, "a"), (0.7, "b")]
    assert parse_data_path([0.3, "a", 0.7, "b"], "k") == [(0.3, "a"), (0.7, "b")]
    with pytest.raises(DataConfigError, match="alternate"):
        parse_data_path([0.3, "a", "b"], "k")
    with pytest.raises(DataConfigError, match="not a weight"):
        parse_data_path(["a", "b"], "k")
