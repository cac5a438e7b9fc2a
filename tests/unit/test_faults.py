"""Spike detection and the resume model check, in-process (the faults themselves: tests/integration/test_faults.py)."""

from __future__ import annotations

import math
import statistics

from llm.checkpoint.format import model_differences
from llm.config import Config, DebugConfig, SpikeDetectionConfig, load_config
from llm.training.faults import SpikeDetector, injected_loss_factor


def test_spikes_are_non_finite_or_far_above_the_window() -> None:
    det = SpikeDetector(SpikeDetectionConfig(window=4, num_std=3.0, min_ratio=1.5))
    assert det.check(math.nan) is not None and det.check(math.inf) is not None  # no history needed
    losses = [4.0, 4.2, 3.9, 4.1]
    assert all(det.check(x) is None for x in losses)  # filling the window: never a spike
    mean, std = statistics.fmean(losses), statistics.pstdev(losses)
    assert det.threshold() == max(mean + 3.0 * std, 1.5 * mean)  # here the ratio decides: 6.075
    assert det.check(6.0) is None  # below 1.5 x mean, although far above mean + 3 std
    spike = det.check(1e7)
    assert spike is not None and spike.loss == 1e7 and spike.threshold == det.threshold()
    saved = list(det.history)  # what a checkpoint records (spike_history)
    det.restore([])  # a checkpoint written before windows were saved: the window refills first
    assert det.threshold() is None and det.check(1e7) is None
    det.restore(saved)  # resume, restart, rollback: the saved window sees a spike at once
    assert det.threshold() == max(
        statistics.fmean(saved) + 3.0 * statistics.pstdev(saved), 1.5 * statistics.fmean(saved)
    )
    assert det.check(1e7) is not None


def test_window_zero_reacts_to_non_finite_losses_only() -> None:
    det = SpikeDetector(SpikeDetectionConfig(window=0))
    assert [det.check(x) for x in (1.0, 1e9, 2.0)] == [None, None, None]
    assert det.check(math.nan) is not None


def test_injection_is_per_global_batch() -> None:
    cfg = DebugConfig(inject_loss_spike_at=[3], inject_loss_value="huge")
    assert [injected_loss_factor(cfg, b) for b in range(4)] == [None, None, 1e8, None]
    assert math.isnan(injected_loss_factor(DebugConfig(inject_loss_spike_at=[1]), 0) or 0.0)


def test_model_differences_name_each_setting() -> None:
    saved = Config().to_dict()
    saved["model"]["vocab_size"] = 8000
    cfg = load_config(None, ["model.num_layers=3", "model.rope_theta=500", "model.vocab_size=8000",
                             "model.activation_checkpointing=true", "model.dropout=0.1", "model.compile=true",
                             "model.loss_chunk_tokens=512"])  # fmt: skip
    meta = {"config": saved, "tokenizer_fingerprint": "aaaa"}
    diffs = model_differences(meta, cfg, tokenizer_fingerprint="bbbb")
    assert diffs[:2] == [
        "model.num_layers: checkpoint 12, config 3",
        "model.rope_theta: checkpoint 10000.0, config 500.0",
    ]
    # checkpointing, dropout, compiled blocks and loss chunks may change: no tensor, no computed value does
    assert "a different tokenizer" in diffs[2] and len(diffs) == 3
    assert model_differences(meta, cfg, tokenizer_fingerprint=None)[:2] == diffs[:2]
