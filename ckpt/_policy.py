"""When a training loop saves: every N steps, every T seconds, and at preemption.

Used by `CheckpointManager.should_save` and `reached_preemption`, called on every process
once per step. Every decision is the same on every process: step counts are, wall-clock
decisions are made on process 0 and shared through the coordination service, and the
preemption step is agreed through it (see `_coord.Coordinator.preemption_point`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from ckpt import _coord
from ckpt.errors import InvalidArgumentError

_POLICIES = itertools.count()


class SavePolicy:
    """The save schedule of one manager.

    Args:
        save_every: save at steps divisible by this.
        save_every_seconds: save when this long has passed since the last save (or since
            the manager started).
        watch_preemption: notice SIGTERM / the runtime's preemption notice.
        clock: seconds on a clock that never goes back (`time.monotonic`; a test gives its
            own, so that no process-wide clock is ever replaced).
    """

    def __init__(self, save_every: int | None, save_every_seconds: float | None,
                 watch_preemption: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if save_every is not None and save_every < 1:
            raise InvalidArgumentError(f"save_every must be >= 1 or None, got {save_every}")
        if save_every_seconds is not None and save_every_seconds <= 0:
            raise InvalidArgumentError(
                f"save_every_seconds must be > 0 or None, got {save_every_seconds}")
        self.save_every = save_every
        self.save_every_seconds = save_every_seconds
        self.watching = _coord.watch_sigterm() if watch_preemption else False
        self._clock = clock
        self.last_save = clock()
        self._checked: tuple[int, bool] | None = None
        self._decided: tuple[int, bool] | None = None
        self._clock_calls = 0
        # Every process creates its managers in the same order, so the n-th policy of the
        # job has the same id everywhere and two managers never share an answer.
        self._id = next(_POLICIES)

    def preempted_at(self, step: int) -> bool:
        """Whether ``step`` is the agreed preemption step (asked once per step; cached)."""
        if not self.watching:
            return False
        if self._checked is not None and self._checked[0] >= step:
            return self._checked[0] == step and self._checked[1]
        hit = _coord.current().preemption_point(step)
        self._checked = (step, hit)
        return hit

    @property
    def scheduled(self) -> bool:
        """Whether a schedule is configured (then `CheckpointManager.save` follows it)."""
        return self.save_every is not None or self.save_every_seconds is not None

    def should_save(self, step: int) -> bool:
        """Whether to save ``step``; identical on every process. Decided once per step:
        asked again for the same step (`should_save`, then `save`) it gives the same answer
        and asks no other process."""
        if self._decided is not None and self._decided[0] == step:
            return self._decided[1]
        answer = self._decide(step)
        self._decided = (step, answer)
        return answer

    def _decide(self, step: int) -> bool:
        if self.preempted_at(step):
            return True
        if self.save_every is not None and step % self.save_every == 0:
            return True
        if self.save_every_seconds is None:
            return False
        coord = _coord.current()
        due = self._clock() - self.last_save >= self.save_every_seconds
        if coord.process_count == 1:
            return due
        # Clocks differ between hosts: process 0 decides, everyone follows.
        self._clock_calls += 1
        answer = coord.broadcast_once(f"policy/{self._id}/{self._clock_calls}",
                                      "1" if due else "0", _coord.DEFAULT_TIMEOUT_S)
        return answer == "1"

    def close(self) -> None:
        """Called once when the manager closes: stops watching SIGTERM."""
        if self.watching:
            self.watching = False
            _coord.unwatch_sigterm()

    def saved(self) -> None:
        """Called when a save starts: restarts the wall-clock interval."""
        self.last_save = self._clock()
