"""The global batch size of every iteration, and the samples trained before it.

Without `train.rampup_batch_size` every iteration trains `train.global_batch_size` samples. With
`rampup_batch_size: [start, increment, samples]` (Megatron's `--rampup-batch-size`) the global batch
starts at `start` and grows by `increment` each time another `samples / ((global - start) /
increment)` samples have been trained, until it reaches `train.global_batch_size` after `samples`
samples; the micro-batch size and data parallelism stay fixed, gradient accumulation grows. As in
Megatron, the size of a step follows the samples trained before it:

    size(trained) = global                                     if trained > samples
                  = start + floor(trained / per_increment) * increment   otherwise

Everything that counts iterations then follows samples: the LR schedule (llm.training.lr_schedule
reads warmup and decay lengths in the samples of that many iterations), the data position, the
numbering of `train.skip_batches` and fault injection.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSchedule:
    global_batch_size: int
    rampup: tuple[int, int, int] | None = None  # (start, increment, samples)

    def size_after(self, trained: int) -> int:
        """The global batch of the step that follows `trained` trained samples."""
        if self.rampup is None:
            return self.global_batch_size
        start, increment, samples = self.rampup
        if trained > samples:
            return self.global_batch_size
        per_increment = samples / ((self.global_batch_size - start) // increment)
        return min(self.global_batch_size, start + int(trained / per_increment) * increment)

    @functools.cached_property
    def _ramp(self) -> list[int]:
        """Samples trained before each iteration of the ramp, through the first at the full size."""
        before = [0]
        while self.size_after(before[-1]) < self.global_batch_size:
            before.append(before[-1] + self.size_after(before[-1]))
        return before

    def samples_before(self, iteration: int) -> int:
        """Samples trained by 0-based iterations 0 .. iteration - 1 of an uninterrupted run."""
        ramp = self._ramp
        if iteration < len(ramp):
            return ramp[iteration]
        return ramp[-1] + (iteration - len(ramp) + 1) * self.global_batch_size

    def size_of(self, iteration: int) -> int:
        """The global batch of 0-based iteration `iteration`."""
        return self.size_after(self.samples_before(iteration))

    def iteration_at(self, position: int) -> int:
        """The 0-based iteration whose global batch holds sample `position` in an uninterrupted run."""
        ramp = self._ramp
        if position < ramp[-1]:
            return bisect.bisect_right(ramp, position) - 1
        return len(ramp) - 1 + (position - ramp[-1]) // self.global_batch_size
