"""The background checkpoint writer process (checkpoint.async_save) on its own: it runs only on CPU
time that training leaves idle (that its files are a synchronous save's bytes is
tests/integration/test_async_save.py's)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from llm.checkpoint.background import WriterProcess
from llm.checkpoint.format import file_checksum


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_the_writer_process_writes_at_idle_priority(tmp_path: Path) -> None:
    state = {"w": torch.arange(12.0).view(3, 4), "step": 3}
    writer = WriterProcess()
    try:
        entry = writer.save(state, str(tmp_path / "state.pt"), zipfile=True, durable=True)
        assert os.sched_getscheduler(writer.process.pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, writer.process.pid) == 19
    finally:
        writer.process.kill()
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    # described as written (writer.write: hashed while written, flushed)
    path = tmp_path / "state.pt"
    assert (entry["size"], entry["xxh3_64"], entry["flushed"]) == (path.stat().st_size, file_checksum(path), True)
