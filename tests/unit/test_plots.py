"""Where plot_runs draws a record: tokens trained at its iteration."""

from __future__ import annotations

import numpy as np

from llm.eval.plots import RunCurves


def test_evaluations_before_the_first_logged_step_are_drawn_where_they_happened() -> None:
    # logged every 10 iterations from 10 on, 8 samples per iteration, 4 tokens per sample
    run = RunCurves(
        "r", 4, steps=[{"iteration": i, "consumed_samples": 8 * i, "loss": 1.0} for i in (10, 20, 30)]
    )
    np.testing.assert_allclose(run.tokens_at([0, 5, 15, 30, 35]), [0, 160, 480, 960, 1120])
