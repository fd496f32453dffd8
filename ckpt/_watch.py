"""Following a run's committed steps as they appear (`CheckpointManager.watch`, ``ckpt list
--watch``): for evaluators on a read-only manager beside a trainer.

A step is yielded once it is committed (its COMMIT written and no rewind abandoning it), in
ascending order, each once. Between two steps the root is listed again, so a step that
retention (or a delete) removed before it was reached is skipped, and said so in the log. A
rewind of the trainer (recorded in the root's LINEAGE before anything is removed) moves the
watch back to the step rewound to: the steps of the new branch are new steps, yielded even
where an abandoned step had the same number.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from ckpt._housekeeping import read_lineage
from ckpt.errors import InvalidArgumentError
from ckpt.storage import Store

log = logging.getLogger("ckpt.manager")

DEFAULT_POLL_S = 5.0


def follow(root: Store, steps_above: Callable[[int | None], list[int]],
           holds: Callable[[int], bool], *, after: int | None, timeout_s: float | None,
           poll_s: float, stop: threading.Event) -> Iterator[int]:
    """Yields each step committed under ``root`` above ``after`` (None: every step), once,
    ascending; ends when ``timeout_s`` passes with no new step (None: never) or ``stop``
    is set. Called by `CheckpointManager.watch`, on any process, on the consumer's thread.

    Args:
        steps_above: the committed steps above a step (None: all), ascending: the
            manager's listing, which looks at the step folders above it only. Called when
            the steps listed before are all yielded, so each folder is looked at once.
        holds: whether a step listed before is still committed (a few requests): asked
            before each later step of a listing is yielded.
        poll_s: how long to wait between listings while no new step is there.

    Raises:
        InvalidArgumentError: ``poll_s`` not above 0, or ``timeout_s`` below 0.
        The listing's errors (`StorageError` when the root cannot be read, after the
        store's own retries).
    """
    if not (isinstance(poll_s, (int, float)) and poll_s > 0 and math.isfinite(poll_s)):
        raise InvalidArgumentError(f"poll_s must be a number of seconds above 0, got {poll_s!r}")
    if timeout_s is not None and not timeout_s >= 0:
        raise InvalidArgumentError(f"timeout_s must be 0 or more (or None), got {timeout_s!r}")
    return _follow(root, steps_above, holds, after, timeout_s, poll_s, stop)


def _follow(root: Store, steps_above: Callable[[int | None], list[int]],
            holds: Callable[[int], bool], cursor: int | None, timeout_s: float | None,
            poll_s: float, stop: threading.Event) -> Iterator[int]:
    known = read_lineage(root).seq  # rewinds before the watch began are history
    ahead: list[int] = []  # listed above the cursor, not yet yielded
    fresh = False  # whether `ahead` was listed since the last step was yielded
    idle_since = time.monotonic()
    while not stop.is_set():
        lineage = read_lineage(root)
        if lineage.seq != known:
            for seq, to in lineage.rewinds:
                if seq > known and cursor is not None and to < cursor:
                    log.info("watch of %s: the run was rewound to step %d; following its new "
                             "branch from there", root.url, to)
                    cursor, ahead = to, []
            known = lineage.seq
        if not ahead:
            ahead, fresh = steps_above(cursor), True
            if read_lineage(root).seq != known:
                continue  # a rewind landed while the root was listed: look again
        if not fresh:
            while ahead and not holds(ahead[0]):
                log.warning("watch of %s: step %d left the run before it was reached "
                            "(retention, a delete or a rewind): skipped", root.url, ahead[0])
                ahead.pop(0)
            if not ahead:
                continue  # all gone: list again for what came since
        if ahead:
            cursor, fresh = ahead.pop(0), False
            yield cursor
            idle_since = time.monotonic()  # the wait for the next step starts now
            continue
        wait = poll_s
        if timeout_s is not None:
            left = timeout_s - (time.monotonic() - idle_since)
            if left <= 0:
                log.info("watch of %s: no new step for %g s: stopping", root.url, timeout_s)
                return
            wait = min(wait, left)
        stop.wait(wait)
