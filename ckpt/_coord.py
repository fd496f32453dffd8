"""The one module that talks to the JAX coordination service.

Processes of a multi-process job meet here: a process-0 value broadcast to all (the attempt
id), barriers with timeouts that name the processes that did not arrive, and small published
values. No device collectives are used, so all of it is safe from a background thread. A
single-process job gets a trivial local implementation.

Every cross-process decision goes through two failure-aware collectives built on those
(the model is PyTorch DCP's ``_DistWrapper``): `Coordinator.gather` (every process
publishes a value or its error; all learn every outcome) and `Coordinator.decide`
(process 0 decides; every process returns the decision or raises process 0's error).
Errors cross processes as `Failure` records (process, error class, message) and are raised
again as the same `ckpt.errors` class, never parsed back from text.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import jax

from ckpt import errors as _errors
from ckpt.errors import CkptError, CoordinationError

DEFAULT_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class Failure:
    """One process's error as it crosses to the others (`Coordinator.gather`, `decide`)."""

    process: int
    kind: str      # the error's class name (a `ckpt.errors` class is raised again as itself)
    message: str

    @classmethod
    def of(cls, process: int, exc: BaseException) -> Failure:
        return cls(process, type(exc).__name__, str(exc))

    def describe(self) -> str:
        return f"process {self.process}: {self.kind}: {self.message}"

    def error(self, context: str = "") -> CkptError:
        """The error to raise on another process: the same class when it is one of
        `ckpt.errors` (a `CkptError`), else `SaveError`; the message names the process.
        ``context`` goes before it."""
        cls = getattr(_errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, CkptError)):
            cls = _errors.SaveError
        what = self.message if cls.__name__ == self.kind else f"{self.kind}: {self.message}"
        try:
            return cls(f"{context}process {self.process}: {what}")
        except TypeError:  # a class whose constructor takes more than a message
            return _errors.SaveError(f"{context}{self.describe()}")


def errors_of(outcomes: dict[int, Any]) -> list[Failure]:
    """The failures among `Coordinator.gather`'s outcomes, by process."""
    return [v for _, v in sorted(outcomes.items()) if isinstance(v, Failure)]


def _encode(process: int, value: Any) -> str:
    if isinstance(value, BaseException):
        f = Failure.of(process, value)
        return json.dumps({"failed": [f.process, f.kind, f.message]})
    return json.dumps({"ok": value})


def _decode(raw: str) -> Any:
    out = json.loads(raw)
    if "failed" in out:
        process, kind, message = out["failed"]
        return Failure(int(process), str(kind), str(message))
    return out["ok"]


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

    def gather(self, key: str, value: Any, timeout_s: float) -> dict[int, Any]:
        """Every process passes a JSON value, or the exception it failed with; every process
        returns every process's outcome by index (a value, or a `Failure`).

        Call on every process with the same ``key``. A process that passes its own failure
        never raises for a process that did not arrive (its own error is the one to report:
        it gets the outcomes that did arrive).

        Raises:
            CoordinationError: (a process that did not fail) not every process arrived
                within ``timeout_s``, naming those that did not.
        """
        mine = _encode(self.process_index, value)
        if self.process_count == 1:
            return {0: _decode(mine)}
        self.publish(f"{key}/from/{self.process_index}", mine)
        try:
            self.barrier(f"{key}/met", timeout_s)
        except CoordinationError:
            if not isinstance(value, BaseException):
                raise
        return {int(k.rsplit("/", 1)[-1]): _decode(v)
                for k, v in self.collect(f"{key}/from/").items()}

    def gather_all(self, key: str, value: Any, timeout_s: float, context: str) -> dict[int, Any]:
        """`gather` for a step every process must pass: returns every process's value, or
        raises on every process: this process's own error if ``value`` is one, else the
        first other process's (`Failure.error`, after ``context``)."""
        outcomes = self.gather(key, value, timeout_s)
        if isinstance(value, BaseException):
            raise value
        failed = errors_of(outcomes)
        if failed:
            raise failed[0].error(context)
        return outcomes

    def decide(self, key: str, fn: Callable[[], Any], timeout_s: float, *,
               unknown: Callable[[CoordinationError], Any] | None = None) -> Any:
        """Process 0 runs ``fn`` (returning a JSON value); every process returns its value,
        or raises its error: process 0 the error itself, the others the same `ckpt.errors`
        class naming process 0 (`Failure.error`).

        ``unknown`` runs on a process other than 0 that waited ``timeout_s`` in vain, with
        the `CoordinationError`: what it returns is the decision (it may raise instead).
        """
        if self.process_index == 0:
            try:
                value = fn()
            except BaseException as exc:
                if self.process_count > 1:
                    self.publish(key, _encode(0, exc))
                raise
            if self.process_count > 1:
                self.publish(key, _encode(0, value))
            return value
        try:
            raw = self.wait_for(key, timeout_s)
        except CoordinationError as exc:
            if unknown is None:
                raise
            return unknown(exc)
        out = _decode(raw)
        if isinstance(out, Failure):
            raise out.error()
        return out

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


def run_on_process_zero(what: str, fn: Callable[[], Any], timeout_s: float) -> Any:
    """`Coordinator.decide` under a key of its own: ``fn`` on process 0, its value (or its
    error) on every process.

    Called by `CheckpointManager.delete` and `rewind` on every process in the same order, so
    the n-th call has the same coordination key everywhere.
    """
    return current().decide(f"op/{next(_OPS)}/{what}", fn, timeout_s)


_LOCAL = LocalCoordinator()


def current() -> Coordinator:
    """The coordinator of this job: distributed when `jax.distributed` is initialised."""
    if jax.process_count() == 1:
        return _LOCAL
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise CoordinationError("jax.process_count() > 1 but jax.distributed has no client")
    return DistributedCoordinator(global_state.client, jax.process_index(), jax.process_count())
