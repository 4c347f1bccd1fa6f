"""A wall-clock budget for a run (`--max-minutes`): the step count is fitted to the time, so that the learning-rate
schedule ends when the time does, rather than being cut off part-way by a guessed step time.

The budget counts from the start of the run (the `Trainer` being built: data loading and model building included)
to the end of the last training step; the final evaluation and export come after it. The first `SKIP` steps of a
run are not timed (CUDA start-up, the data workers' first batches); from then on, after every step, the total is
set to the steps that fit in the time left at the mean rate since (evaluations and checkpoints included), at most
`cap`. When the time is spent, the run ends after the step in flight.
"""
from __future__ import annotations

import time
from typing import Callable

SKIP = 5  # steps of a run left out of the rate
WINDOW = 5  # steps timed before the first fit


class TimeBudget:
    def __init__(self, minutes: float, cap: int | None = None, clock: Callable[[], float] = time.monotonic):
        if not minutes > 0:
            raise ValueError(f"--max-minutes must be > 0, got {minutes}")
        self.seconds, self.cap, self.clock = 60.0 * minutes, cap, clock
        self.start = clock()
        self.first: int | None = None  # the first step this run took
        self.mark: tuple[int, float] | None = None  # (step, time) where the rate is measured from
        self.rate: float | None = None  # seconds per step, once measured

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def fit(self, step: int, total: int) -> int:
        """The run's step count, `step` steps done, `total` planned: `step` when the time is spent, otherwise the
        steps that fit (at least step + 1), or `total` while the rate is not yet measured."""
        now, left = self.clock(), self.left()
        if left <= 0:
            return step
        if self.first is None:
            self.first = step
        if self.mark is None and step - self.first >= SKIP:
            self.mark = (step, now)
        if self.mark is None or step - self.mark[0] < WINDOW:
            return total
        self.rate = (now - self.mark[1]) / (step - self.mark[0])
        fitted = step + max(1, int(left / self.rate)) if self.rate > 0 else total
        return min(fitted, self.cap) if self.cap is not None else fitted
