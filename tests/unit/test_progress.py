"""Progress reporting off a terminal: periodic log lines with count, rate and ETA, and a summary."""

from __future__ import annotations

import logging

import pytest

from llm.progress import Progress


def test_lines_off_a_terminal_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llm.progress")
    with Progress(4, "perplexity", unit="windows", interval=0.0) as p:  # pytest's stderr: no TTY, no bar
        for _ in range(4):
            p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("perplexity: 1/4 (25%) windows, ") and "windows/s, eta " in lines[0]
    assert lines[-1].startswith("perplexity: 4/4 (100%) windows") and "done in" in lines[-1]
    caplog.clear()
    with Progress(None, "writing", enabled=False, interval=0.0) as p:
        p.update(3)
    assert caplog.records == []  # only the reporting rank logs
