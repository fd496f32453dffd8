"""The one module that talks to the JAX coordination service.

Processes of a multi-process job meet here: a process-0 value broadcast to all (the attempt
id), barriers with timeouts that name the processes that did not arrive, and small published
values (the commit outcome). No device collectives are used, so all of it is safe from a
background thread. A single-process job gets a trivial local implementation.
"""

from __future__ import annotations

import abc
import itertools
import os
import threading
from typing import Any

import jax

from ckpt.errors import CkptError, CoordinationError

DEFAULT_TIMEOUT_S = 600.0


class Coordinator(abc.ABC):
    """Meeting points of the processes of one job.

    Keys are namespaced by the caller with a per-save prefix that every process derives the
    same way (the n-th save of a job has the same prefix on every process).
    """

    process_index: int
    process_count: int

    @abc.abstractmethod
    def broadcast(self, key: str, value: str | None, timeout_s: float) -> str:
        """Process 0 passes ``value``; every process returns it."""

    @abc.abstractmethod
    def barrier(self, key: str, timeout_s: float) -> None:
        """Returns once every process has called it with the same key.

        Raises:
            CoordinationError: not all arrived within ``timeout_s``; names the missing ones.
        """

    @abc.abstractmethod
    def publish(self, key: str, value: str) -> None:
        """Sets a value any process can wait for."""

    @abc.abstractmethod
    def wait_for(self, key: str, timeout_s: float) -> str:
        """Returns the value published under ``key``, waiting up to ``timeout_s``."""

    @abc.abstractmethod
    def collect(self, prefix: str) -> dict[str, str]:
        """Every value published so far under keys starting with ``prefix`` (no waiting)."""

    @abc.abstractmethod
    def broadcast_once(self, key: str, value: str | None, timeout_s: float) -> str:
        """`broadcast` of a value read once by each process, then deleted by the last
        reader (the service keeps every key for the life of the job otherwise)."""

    @abc.abstractmethod
    def preemption_point(self, step: int) -> bool:
        """Whether the job is being preempted and ``step`` is the step every process stops at.

        Called once per step, with increasing steps, on every process. Returns True on
        every process at the same step.
        """


class LocalCoordinator(Coordinator):
    """The coordinator of a single-process job: every meeting is immediate."""

    def __init__(self) -> None:
        self.process_index = 0
        self.process_count = 1
        self._values: dict[str, str] = {}
        self._cond = threading.Condition()

    def broadcast(self, key: str, value: str | None, timeout_s: float) -> str:
        assert value is not None
        return value

    def barrier(self, key: str, timeout_s: float) -> None:
        return None

    def publish(self, key: str, value: str) -> None:
        with self._cond:
            self._values[key] = value
            self._cond.notify_all()

    def wait_for(self, key: str, timeout_s: float) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._values, timeout=timeout_s):
                raise CoordinationError(f"no value for {key!r} within {timeout_s:.0f} s")
            return self._values[key]

    def collect(self, prefix: str) -> dict[str, str]:
        with self._cond:
            return {k: v for k, v in self._values.items() if k.startswith(prefix)}

    def broadcast_once(self, key: str, value: str | None, timeout_s: float) -> str:
        return self.broadcast(key, value, timeout_s)

    def preemption_point(self, step: int) -> bool:
        return _sigterm_received.is_set()


class DistributedCoordinator(Coordinator):
    """Meets through `jax.distributed`'s coordination service (key-value store, barriers)."""

    def __init__(self, client: Any, process_index: int, process_count: int) -> None:
        self._client = client
        self.process_index = process_index
        self.process_count = process_count

    def broadcast(self, key: str, value: str | None, timeout_s: float) -> str:
        if self.process_index == 0:
            assert value is not None
            self._client.key_value_set(f"ckpt/{key}", value)
            return value
        return self.wait_for(key, timeout_s)

    def barrier(self, key: str, timeout_s: float) -> None:
        self._client.key_value_set(f"ckpt/{key}/arrived/{self.process_index}", "1")
        try:
            self._client.wait_at_barrier(f"ckpt/{key}", int(timeout_s * 1000))
        except Exception as exc:
            arrived = {int(k.rsplit("/", 1)[-1]) for k, _ in
                       self._client.key_value_dir_get(f"ckpt/{key}/arrived/")}
            missing = sorted(set(range(self.process_count)) - arrived)
            if not missing:
                # Everyone has arrived by now: this process came after the others had
                # already given up on it.
                raise CoordinationError(
                    f"process {self.process_index} reached {key!r} only after the other "
                    f"processes had stopped waiting for it ({timeout_s:.0f} s); the save "
                    "failed on them") from exc
            raise CoordinationError(
                f"processes {missing} did not reach {key!r} within {timeout_s:.0f} s") from exc

    def publish(self, key: str, value: str) -> None:
        self._client.key_value_set(f"ckpt/{key}", value)

    def wait_for(self, key: str, timeout_s: float) -> str:
        try:
            return str(self._client.blocking_key_value_get(f"ckpt/{key}", int(timeout_s * 1000)))
        except Exception as exc:
            raise CoordinationError(
                f"process {self.process_index} got no value for {key!r} within "
                f"{timeout_s:.0f} s") from exc

    def collect(self, prefix: str) -> dict[str, str]:
        return {k[len("ckpt/"):]: str(v)
                for k, v in self._client.key_value_dir_get(f"ckpt/{prefix}")}

    def broadcast_once(self, key: str, value: str | None, timeout_s: float) -> str:
        answer = self.broadcast(key, value, timeout_s)
        if self.process_index != 0:
            # Counted reads: whichever process reads last, however far apart they run,
            # deletes the value and its counter.
            reads = self._client.key_value_increment(f"ckpt/{key}/reads", 1)
            if reads == self.process_count - 1:
                self._client.key_value_delete(f"ckpt/{key}/reads")
                self._client.key_value_delete(f"ckpt/{key}")
        return answer

    def preemption_point(self, step: int) -> bool:
        # JAX's preemption sync manager (in the coordination service) notices SIGTERM and
        # the runtime's preemption notices on any process, and agrees on the first step
        # every process has yet to pass: the same step everywhere.
        from jax._src.distributed import global_state

        manager = global_state.preemption_sync_manager
        if manager is None:
            return _sigterm_received.is_set()
        return bool(manager.reached_sync_point(step))


_sigterm_received = threading.Event()
_watchers = 0
_previous_handler: Any = None
_our_handler: Any = None


def watch_sigterm() -> bool:
    """Makes SIGTERM request a preemption save instead of ending the process at once.

    Called by each `CheckpointManager` that watches preemption, on creation; every call that
    returns True is paired with one `unwatch_sigterm` (at `close`). A multi-process job leaves
    SIGTERM to JAX's preemption sync manager. Otherwise the first watcher installs a Python
    handler (main thread only) that chains to the handler it replaced; a second SIGTERM ends
    the process as the default action would; the last watcher to close puts the replaced
    handler back. Returns whether SIGTERM is watched.
    """
    global _watchers, _previous_handler, _our_handler
    if jax.process_count() > 1:
        return True
    import signal

    if _watchers == 0:
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if previous is _our_handler and _our_handler is not None:
            # Ours from before, left in place by a close off the main thread: chain to
            # what it replaced, not to it (it would end the process on the first SIGTERM).
            previous = _previous_handler

        def on_sigterm(signum: int, frame: Any) -> None:
            if _sigterm_received.is_set():
                # A second SIGTERM: the loop is not checking `reached_preemption` (or the
                # save hangs); stop as the default action would.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            _sigterm_received.set()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        _previous_handler, _our_handler = previous, on_sigterm
    _watchers += 1
    return True


def unwatch_sigterm() -> None:
    """Undoes one `watch_sigterm` that returned True; the last one restores the handler that
    was there before (unless someone replaced ours since, or it is not the main thread)."""
    global _watchers, _previous_handler, _our_handler
    if jax.process_count() > 1 or _watchers == 0:
        return
    import signal

    _watchers -= 1
    if _watchers == 0:
        _sigterm_received.clear()  # a manager created later starts without a preemption
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is _our_handler:
                signal.signal(signal.SIGTERM, _previous_handler if _previous_handler is not None
                              else signal.SIG_DFL)
            _previous_handler = _our_handler = None


_OPS = itertools.count()


def run_on_process_zero(what: str, fn: Any, timeout_s: float) -> None:
    """Runs ``fn()`` on process 0 while every other process waits for its outcome.

    Called by `CheckpointManager.delete` and `rewind` on every process in the same order, so
    the n-th call has the same coordination key everywhere. Raises the error of ``fn`` on
    process 0, and on the others a `CkptError` naming it.
    """
    coord = current()
    key = f"op/{next(_OPS)}/{what}"
    if coord.process_index == 0:
        try:
            fn()
        except BaseException as exc:
            coord.publish(key, f"{type(exc).__name__}: {exc}")
            raise
        coord.publish(key, "ok")
        return
    outcome = coord.wait_for(key, timeout_s)
    if outcome != "ok":
        raise CkptError(f"process 0 failed to {what}: {outcome}")


_LOCAL = LocalCoordinator()


def current() -> Coordinator:
    """The coordinator of this job: distributed when `jax.distributed` is initialised."""
    if jax.process_count() == 1:
        return _LOCAL
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise CoordinationError("jax.process_count() > 1 but jax.distributed has no client")
    return DistributedCoordinator(global_state.client, jax.process_index(), jax.process_count())
