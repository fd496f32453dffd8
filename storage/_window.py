"""A window of in-flight storage operations whose total byte cost is bounded.

Every streaming loop above the storage layer (save's chunk writes, restore's and verify's
chunk reads) issues TensorStore futures in order and must not hold more than a memory
budget of them at once; this is that loop's one implementation, beside the `Deadline` it
waits under.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from ckpt.storage._deadline import Deadline


class Window:
    """Futures in flight, finished in issue order, with their summed cost at most ``limit``.

    One future is always admitted, however large, so progress never stalls. With a
    ``deadline``, waiting for a future ends when it passes (`DeadlineExceededError`, saying
    the window was ``doing`` that), and what is in flight is cancelled. After an error its
    owner calls `settle`.
    """

    def __init__(self, limit: int, deadline: Deadline | None = None,
                 doing: str = "waiting for chunk I/O") -> None:
        self.limit = limit
        self._deadline = deadline
        self._doing = doing
        self._pending: collections.deque[tuple[Any, int, Callable[[Any], None]]] = \
            collections.deque()
        self._cost = 0

    def make_room(self, cost: int) -> None:
        """Finishes older futures until one of ``cost`` fits (or none is left): for a caller
        whose next request needs memory of its own before it starts (a buffer to read into),
        which the ones finishing may hand back."""
        while self._pending and self._cost + cost > self.limit:
            self._finish_one()

    def add(self, future: Any, cost: int, done: Callable[[Any], None]) -> None:
        """Admits ``future`` (first finishing older ones to make room); ``done(future)`` runs
        when it is finished, on this thread, in issue order."""
        self.make_room(cost)
        self._pending.append((future, cost, done))
        self._cost += cost

    def drain(self) -> None:
        """Finishes every future still in flight."""
        while self._pending:
            self._finish_one()

    def finish_oldest(self) -> bool:
        """Finishes the oldest future in flight; False if there is none."""
        if not self._pending:
            return False
        self._finish_one()
        return True

    def settle(self) -> None:
        """After an error: waits for what is still in flight to finish, dropping its errors
        and outcomes, so that nothing of the loop is still reading or writing when its
        caller moves on (a failed restore or save never leaves requests running behind
        it). With a deadline, what is left when it passes is cancelled."""
        while self._pending:
            future, _, _ = self._pending.popleft()
            try:
                if self._deadline is not None:
                    self._deadline.wait_ready(future, self._doing)
                else:
                    future.exception()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # past the deadline, or cancelled (a CancelledError)
                for left, _, _ in self._pending:
                    left.cancel()
                self._pending.clear()
        self._cost = 0

    def _finish_one(self) -> None:
        future, cost, done = self._pending[0]
        if self._deadline is not None:
            self._deadline.wait_ready(future, self._doing)  # `done` takes its own error
        self._pending.popleft()
        self._cost -= cost
        done(future)
