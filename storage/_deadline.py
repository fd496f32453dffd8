"""End-to-end deadlines: a bound on a whole save or restore, not only on each request.

Every request already has a deadline of its own (``request_timeout_s`` in
`storage.configure`), but a save or restore makes many requests, each retried: only a
deadline over the whole operation keeps the promise that ``timeout_s`` bounds it. A
`Deadline` is created by the save or restore that owns ``timeout_s`` and passed down: to a
`DeadlineStore` for the store's own calls, and to `Deadline.result` for TensorStore futures.

A call still running when its deadline passes is abandoned, not interrupted (neither the
file system nor fsspec's clients can be): it goes on in a daemon thread until its backend's
request deadline ends it, and its result is dropped. Callers therefore treat a
`DeadlineExceededError` as "this may still happen" for the call that raised it (a COMMIT
create may still land: see ckpt/_commit.py), and as "never happened" for every call that
the deadline stopped before it started.
"""

from __future__ import annotations

import concurrent.futures
import errno
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ckpt.storage._base import ChunkIO, Op, Store
from ckpt.storage._errors import InvalidArgumentError, StorageError
from ckpt.storage._wrapper import WrapperStore

T = TypeVar("T")


class DeadlineExceededError(StorageError, TimeoutError):
    """A save or restore did not finish within its ``timeout_s``; names the operation, the
    URL and what was under way."""


class Deadline:
    """A point in monotonic time by which ``what`` (e.g. "saving gs://b/ckpt") must end.

    Thread-safe: read by the thread that runs the operation and by the threads it starts.
    """

    def __init__(self, seconds: float, what: str, option: str = "timeout_s") -> None:
        if not seconds > 0:
            raise InvalidArgumentError(
                f"{option} must be a positive number of seconds, not {seconds!r}")
        self.seconds = float(seconds)
        self.what = what
        self.option = option  # what the user set: a keyword, or the CLI's --timeout
        self._end = time.monotonic() + self.seconds

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self._end - time.monotonic())

    def error(self, doing: str) -> DeadlineExceededError:
        """The error for running out of time while ``doing`` (e.g. "writing <url>/COMMIT")."""
        return DeadlineExceededError(
            errno.ETIMEDOUT, f"{self.what} did not finish within {self.option}={self.seconds:g} s "
                             f"(still {doing})")

    def check(self, doing: str) -> None:
        """Raises `DeadlineExceededError` if no time is left before starting ``doing``."""
        if self.remaining() <= 0:
            raise self.error(doing)

    def wait_ready(self, future: Any, doing: str) -> None:
        """Waits at most the time left for a TensorStore ``future`` to finish, whether it
        succeeded or failed (its own error is left to whoever takes its result); cancels it
        and raises `DeadlineExceededError` if it has not."""
        try:
            future.exception(timeout=self.remaining())
        except TimeoutError as exc:
            if future.done():  # the operation's own error, not our wait
                return
            future.cancel()
            raise self.error(doing) from exc

    def result(self, future: Any, doing: str) -> Any:
        """``future.result()`` of a TensorStore future, waiting at most the time left."""
        self.wait_ready(future, doing)
        return future.result()

    def call(self, doing: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, abandoned (left running on a daemon thread) when time runs out."""
        self.check(doing)
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed to the caller's thread below
                box.append((False, exc))

        worker = threading.Thread(target=run, name="ckpt-deadline-call", daemon=True)
        worker.start()
        worker.join(self.remaining())
        if not box:
            raise self.error(doing)
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value


class DeadlineStore(WrapperStore):
    """``inner`` with every call bounded by ``deadline``: once it passes, calls fail at once
    with `DeadlineExceededError` and a call under way is abandoned.

    Created by a save (`ckpt.save_async`, `CheckpointManager.save`) and by a restore given
    ``timeout_s``; used from whichever thread runs that operation.
    """

    def __init__(self, inner: Store, deadline: Deadline) -> None:
        super().__init__(inner)
        self.deadline = deadline

    def wait(self, future: Any, doing: str | ChunkIO) -> Any:
        self.deadline.wait_ready(future, f"{doing} ({self.url})")
        return self.inner.wait(future, doing)

    def _kvstore_spec(self, prefix: str) -> dict[str, Any]:
        return self.inner._kvstore_spec(prefix)  # no I/O: nothing to bound

    def read_async(self, key: str, *, max_bytes: int, into: memoryview | None = None
                   ) -> concurrent.futures.Future[bytes | memoryview]:
        # Nothing is queued once the deadline has passed; its wait is bounded by `wait`.
        self.deadline.check(f"{Op.READ} {self.describe(key)}")
        return self.inner.read_async(key, max_bytes=max_bytes, into=into)

    def _delegate(self, doing: Op, key: str, fn: Callable[..., T], *args: Any) -> T:
        return self.deadline.call(f"{doing} {self.describe(key)}", fn, *args)


def bounded(store: Store, timeout_s: float | None, what: str,
            option: str = "timeout_s") -> Store:
    """``store`` under a new deadline of ``timeout_s`` seconds for ``what`` (e.g. "reading
    the metadata of"; the URL is added), or ``store`` itself when ``timeout_s`` is None.
    Called by the read-only entry points (`ckpt.metadata`, `ckpt.verify`, the CLI's
    ``--timeout``, named by ``option`` in errors) as they open their store."""
    if timeout_s is None:
        return store
    return DeadlineStore(store, Deadline(timeout_s, f"{what} {store.url}", option))
