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
