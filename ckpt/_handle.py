"""The handle of a save, the registry of saves in flight and the exit hook that lets them
commit.

Every save the library starts (`ckpt.save_async`, a manager's save, a local-tier copy, the
commit of a local step to the persistent root) gets a `SaveHandle` and is listed in the
registry (`track`) before its background part starts, until it commits or its failure is
seen. At interpreter exit `_finish_saves_at_exit` waits for every listed save, including
saves that another save starts while it waits (a local commit starts the root's), before
the storage clients' thread pools shut down.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours; see below)
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from ckpt.errors import CommitOutcomeUnknownError

log = logging.getLogger("ckpt.save")

@dataclasses.dataclass(frozen=True)
class SaveTimings:
    """How one save went on this process (`SaveHandle.timings`, once it committed).

    Attributes:
        blocked_s: inside `save_async` (validation, planning, the snapshot).
        write_s: this process's chunk writes and host report, after `save_async` returned.
        commit_s: from the end of those writes to the commit (waiting for the other
            processes, process 0's checks, manifest and COMMIT).
        total_s: from the call to the commit.
        nbytes: the checkpoint's bytes (arrays and inline leaves, all processes).
        written_bytes: the chunk bytes this process wrote.
        leaves: the number of leaves saved.
        snapshot: how the snapshot was taken: ``view``, ``device`` or ``host``
            (`ckpt.save_async`'s ``snapshot``).
        host_peak_bytes: the most bytes of chunk data fetched from devices and not yet
            durable at once (0 for ``view``, which fetches nothing); at most
            ``memory_budget``, or one shard where a shard is larger.
    """

    blocked_s: float
    write_s: float
    commit_s: float
    total_s: float
    nbytes: int
    written_bytes: int
    leaves: int
    snapshot: str = "view"
    host_peak_bytes: int = 0

    @property
    def mib_per_s(self) -> float:
        """The checkpoint's bytes over the whole save's time, in MiB/s."""
        return self.nbytes / max(self.total_s, 1e-9) / 2**20


class SaveHandle:
    """The outcome of one asynchronous save.

    Returned by `ckpt.save_async` and `CheckpointManager.save` on every process. The save is
    committed once `wait` returns without raising on any process.
    """

    def __init__(self, url: str, step: int | None = None) -> None:
        self.url = url
        self.step = step
        self.attempt = ""
        self.timings: SaveTimings | None = None  # set once committed
        # A manager with a local tier: this step's commit to the persistent root, set once
        # the local commit (this handle) started it; None for a step kept locally only.
        self.remote: SaveHandle | None = None
        self._event = threading.Event()
        self._exc: BaseException | None = None
        self.observed_by_user = False
        # Set by the pipeline that runs the save (`attach_cancel`): asks it to stop.
        self.on_cancel: Callable[[], None] | None = None
        self._cancel_asked = False

    def _finish(self, exc: BaseException | None) -> None:
        """Called once, by the thread that ran the save, when it has stopped touching
        storage."""
        self._exc = exc
        self._event.set()
        if exc is None:  # a failure stays listed until someone sees it, or until exit
            self._forget()

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def mark_observed(self) -> None:
        """Records that the save's outcome reached the user (its error is not reported
        again, at exit or by a manager). Called by `wait`, `exception` and the manager."""
        self.observed_by_user = True
        self._forget()

    def describe(self) -> str:
        return f"step {self.step} ({self.url})" if self.step is not None else self.url

    def _await(self, timeout: float | None) -> bool:
        """Waits until the save has finished; False if ``timeout`` passed first."""
        if threading.current_thread() is not threading.main_thread():
            return self._event.wait(timeout)
        # Ctrl-C raises KeyboardInterrupt on the main thread inside whatever runs there;
        # inside Event.wait it can leave the event's internal lock held, after which
        # neither the save thread (finishing) nor the exit hook (waiting) ever gets it.
        # Polling is_set() holds no lock.
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while not self._event.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(pause if left is None else min(pause, left))
            pause = min(2 * pause, 0.02)
        return True

    def outcome(self) -> BaseException | None:
        """Waits for the save and returns its error without marking it as seen by the user."""
        self._await(None)
        return self._exc

    def done(self) -> bool:
        """Whether the save has committed or failed."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until the checkpoint is committed.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
            SaveError (or another CkptError): the save failed; nothing was committed.
        """
        if not self._await(timeout):
            raise TimeoutError(f"save to {self.url} still running after {timeout} s")
        self.mark_observed()
        if self._exc is not None:
            raise self._exc

    def attach_cancel(self, ask: Callable[[], None]) -> None:
        """Called by the pipeline that runs this save, before its background part starts:
        how to ask it to stop. A cancel asked for before (a local step's commit to the
        root, cancelled before it started) is passed on at once."""
        self.on_cancel = ask
        if self._cancel_asked:
            ask()

    def cancel(self, timeout: float | None = None) -> bool:
        """Stops the save: on this process and every other of the job, at the next chunk
        boundary; nothing is committed and its attempt is removed. Returns once the save
        has stopped touching storage on this process.

        Call it on any process (one is enough; every one may). A cancel racing the commit
        loses or wins whole: process 0 looks for cancels once more right before it claims
        the commit. After a cancel that won, `wait` raises `SaveCancelledError`; its
        outcome counts as seen (a manager's next save does not raise it).

        Returns:
            True when the save ended without committing (cancelled, or failed before),
            False when it had committed first.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
            CommitOutcomeUnknownError: this process could not learn in time whether the
                save committed (process 0 was still creating COMMIT): COMMIT decides.
        """
        self._cancel_asked = True
        if self.on_cancel is not None and not self._event.is_set():
            self.on_cancel()
        if not self._await(timeout):
            raise TimeoutError(f"cancelling the save to {self.url}: still running after "
                               f"{timeout} s")
        if self._exc is None:
            log.info("cancel of %s came too late: it is committed", self.describe())
            return False
        if isinstance(self._exc, CommitOutcomeUnknownError):
            raise self._exc  # it may still commit: COMMIT decides, not this cancel
        self.mark_observed()
        log.info("%s was not committed (%s)", self.describe(), type(self._exc).__name__)
        return True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Blocks like `wait`, then returns the save's error instead of raising it."""
        if not self._await(timeout):
            raise TimeoutError(f"save to {self.url} still running after {timeout} s")
        self.mark_observed()
        return self._exc


_LIVE: set[SaveHandle] = set()
_LIVE_LOCK = threading.Lock()


def attempts_in_flight() -> set[str]:
    """The attempt ids of the saves this process has in flight (any manager's)."""
    with _LIVE_LOCK:
        return {h.attempt for h in _LIVE if h.attempt and not h.done()}


def track(handle: SaveHandle) -> None:
    """Lists ``handle`` as a save in flight (the exit hook waits for it). Called by whoever
    starts a save's background part, before it starts."""
    with _LIVE_LOCK:
        _LIVE.add(handle)


def _finish_saves_at_exit() -> None:
    """Lets every save in flight commit before the interpreter shuts down.

    Registered with `threading._register_atexit`, after `concurrent.futures` registered its
    own hook: such hooks run newest first, so this one runs while thread pools (which the
    storage clients use) still accept work, and before non-daemon threads are joined. It
    waits until no save is listed, so a save started by another one meanwhile (a local
    tier's commit to the persistent root) is waited for too. A save that fails or is
    interrupted here (a second Ctrl-C) gets one line on stderr naming it (the one place the
    library writes to stderr, because logging may be gone by now), and the process then
    exits with status 1 (`_exit_status`).
    """
    global _LOST_AT_EXIT
    seen: set[int] = set()
    while True:
        with _LIVE_LOCK:
            pending = sorted((h for h in _LIVE if id(h) not in seen), key=lambda h: h.url)
        if not pending:
            return
        for handle in pending:
            seen.add(id(handle))
            try:
                exc = handle.outcome()
            except KeyboardInterrupt:  # the interrupt sets the exit status itself
                sys.stderr.write(f"ckpt: exiting before {handle.describe()} was committed: it "
                                 "is not a checkpoint; `ckpt gc` removes what it wrote\n")
                continue
            if exc is not None and not handle.observed_by_user:
                _LOST_AT_EXIT = True
                handle.mark_observed()
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                sys.stderr.write(f"ckpt: {handle.describe()} was not committed: {first}\n")


# Set by the exit hook when a save it waited for was not committed: the process then exits
# with status 1, so that a scheduler does not record the lost last checkpoint as success.
_LOST_AT_EXIT = False


def _exit_status() -> None:
    """An exit handler (registered when this module is first imported; `atexit` runs
    handlers newest first): ends a single-process job with status 1 if a save the exit hook
    waited for was not committed, after flushing logging and the standard streams. Handlers
    registered before this module was imported are skipped then; in a multi-process job
    one of them is JAX's distributed shutdown, which the other processes wait for, so there
    the line on stderr is all (the process exits as it would)."""
    if _LOST_AT_EXIT and _single_process():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(1)


def _single_process() -> bool:
    try:
        import jax

        count: int = jax.process_count()  # JAX's cache decorator hides its int return type
        return count == 1
    except Exception:  # JAX already torn down: nothing to leave out
        return True


atexit.register(_exit_status)

try:
    threading._register_atexit(_finish_saves_at_exit)  # type: ignore[attr-defined]
except AttributeError:  # an interpreter without it: atexit runs after threads are joined
    atexit.register(_finish_saves_at_exit)
