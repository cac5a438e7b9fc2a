"""Progress reporting off a terminal: periodic lines with count, rate and ETA, and a summary."""

from __future__ import annotations

import io

from llm.progress import Progress


def test_lines_off_a_terminal_with_rate_and_eta() -> None:
    out = io.StringIO()  # not a TTY: no bar
    with Progress(4, "perplexity", unit="windows", interval=0.0, stream=out) as p:
        for _ in range(4):
            p.update()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("perplexity: 1/4 (25%) windows, ") and "windows/s, eta " in lines[0]
    assert lines[-1].startswith("perplexity: 4/4 (100%) windows") and "done in" in lines[-1]
    quiet = io.StringIO()
    with Progress(None, "writing", enabled=False, interval=0.0, stream=quiet) as p:
        p.update(3)
    assert quiet.getvalue() == ""  # only the reporting rank prints
