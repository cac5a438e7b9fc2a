from __future__ import annotations

import math

import pytest

from llm.config import TrainConfig
from llm.training.lr_schedule import lr_at


def test_warmup_then_cosine_to_min() -> None:
    cfg = TrainConfig(train_iters=110, lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    values = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant() -> None:
    lin = TrainConfig(train_iters=100, lr=1.0, min_lr=0.0, lr_warmup_iters=0, lr_decay_style="linear")
    assert lr_at(50, lin) == pytest.approx(0.5)
    const = TrainConfig(train_iters=100, lr=0.3, min_lr=0.0, lr_warmup_iters=5, lr_decay_style="constant")
    assert lr_at(2, const) == pytest.approx(0.3 * 3 / 5) and lr_at(80, const) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("style", "factor"),
    [
        ("linear", lambda r: 1 - r),
        ("cosine", lambda r: 0.5 * (1 + math.cos(math.pi * r))),
        ("exponential", lambda r: 2 * 0.5**r - 1),
        ("minus_sqrt", lambda r: 1 - math.sqrt(r)),
    ],
)
def test_wsd_holds_the_rate_then_decays_over_its_last_iterations(style: str, factor) -> None:  # type: ignore[no-untyped-def]
    """WSD over 100 iterations, warmup 10, decay phase the last 20 (iterations 80-99): lr = min_lr +
    (lr - min_lr) * factor((i - 80) / 20) there, lr in between."""
    cfg = TrainConfig(train_iters=100, lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="WSD",
                      lr_wsd_decay_iters=20, lr_wsd_decay_style=style)  # fmt: skip
    assert lr_at(4, cfg) == pytest.approx(0.5)  # warmup as before
    assert [lr_at(i, cfg) for i in (10, 40, 79, 80)] == [1.0, 1.0, 1.0, 1.0]
    for i in (81, 85, 90, 99):
        assert lr_at(i, cfg) == pytest.approx(0.1 + 0.9 * factor((i - 80) / 20), abs=1e-12)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(150, cfg) == pytest.approx(0.1)
    fraction = TrainConfig(train_iters=100, lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="WSD",
                           lr_wsd_decay_fraction=0.2, lr_wsd_decay_style=style)  # fmt: skip
    assert [lr_at(i, fraction) for i in range(100)] == [lr_at(i, cfg) for i in range(100)]


def test_a_cooldown_branch_continues_at_the_stable_rate_and_decays_at_its_new_end() -> None:
    """A run planned for 1000 iterations is branched at 400 into a cool-down ending at 500: up to the
    branch point the schedules agree; from there the branch decays over its 100 iterations."""
    main = TrainConfig(train_iters=1000, lr=1.0, min_lr=0.0, lr_warmup_iters=10, lr_decay_style="WSD",
                       lr_wsd_decay_iters=100, lr_wsd_decay_style="linear")  # fmt: skip
    branch = TrainConfig(train_iters=500, lr=1.0, min_lr=0.0, lr_warmup_iters=10, lr_decay_style="WSD",
                         lr_wsd_decay_iters=100, lr_wsd_decay_style="linear")  # fmt: skip
    assert [lr_at(i, branch) for i in range(400)] == [lr_at(i, main) for i in range(400)]
    assert [lr_at(i, branch) for i in (400, 450, 499)] == pytest.approx([1.0, 0.5, 0.01])


def megatron_rampup_table(start: int, increment: int, samples: int, gbs: int, iters: int) -> list[int]:
    """Megatron's RampupBatchsizeNumMicroBatchesCalculator, step by step: the global batch of each
    iteration from the samples consumed before it."""
    per_increment = samples / ((gbs - start) // increment)
    consumed, out = 0, []
    for _ in range(iters):
        size = gbs if consumed > samples else start + int(consumed / per_increment) * increment
        out.append(size)
        consumed += size
    return out


@pytest.mark.parametrize(
    ("ramp", "gbs"), [((8, 8, 200), 32), ((4, 12, 1000), 64), ((16, 16, 1), 32), ((8, 24, 100), 32)]
)
def test_the_batch_schedule_is_megatrons_rampup(ramp: tuple[int, int, int], gbs: int) -> None:
    from llm.config.batches import BatchSchedule

    table = megatron_rampup_table(*ramp, gbs, 200)
    schedule = BatchSchedule(gbs, ramp)
    assert [schedule.size_of(i) for i in range(200)] == table
    assert [schedule.samples_before(i) for i in range(201)] == [sum(table[:i]) for i in range(201)]
    # every sample position maps back to the iteration whose batch holds it
    for i in (0, 1, 5, 17, 60, 199):
        first = schedule.samples_before(i)
        assert schedule.iteration_at(first) == schedule.iteration_at(first + table[i] - 1) == i


def test_under_a_rampup_the_schedule_follows_samples() -> None:
    """Warmup over the samples of the first 4 iterations, cosine decay to the end of iteration 40, both
    measured in samples: at a constant batch exactly the iteration formula."""
    ramp = TrainConfig(train_iters=40, global_batch_size=32, micro_batch_size=4, rampup_batch_size=[8, 8, 200],
                       lr=1.0, min_lr=0.0, lr_warmup_iters=4, lr_decay_style="cosine")  # fmt: skip
    sizes = megatron_rampup_table(8, 8, 200, 32, 40)
    before = [sum(sizes[:i]) for i in range(41)]
    assert [lr_at(i, ramp) for i in range(4)] == pytest.approx([before[i + 1] / before[4] for i in range(4)])
    for i in (4, 10, 25, 39):
        progress = (before[i] - before[4]) / (before[40] - before[4])
        assert lr_at(i, ramp) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    flat = TrainConfig(train_iters=40, lr=1.0, min_lr=0.0, lr_warmup_iters=4, lr_decay_style="cosine")
    assert lr_at(25, flat) == 0.5 * (1 + math.cos(math.pi * (25 - 4) / (40 - 4)))
