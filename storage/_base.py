"""The `Store` interface every backend implements.

A store is a flat key-value namespace below one root `Location`. Keys are relative,
``/``-separated, and validated here once for every backend so that no key can reach outside
the root. Values are whole objects: every write replaces an object atomically (readers see the
old or the new bytes, never a mix).

Callers: the ``ckpt`` layer (manifests, host reports, COMMIT markers, retention) and
``restore`` (manifests); array chunks bypass the store and go through TensorStore with the
spec from `Store.kvstore_spec`, which addresses the very same objects.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import enum
import errno
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import tensorstore as ts

from ckpt.storage._errors import InvalidKeyError, UnreadableObjectError
from ckpt.storage._url import Location

_CONTEXT_LOCK = threading.Lock()
# Objects `Store.write_many` writes at once (each a request on object stores).
WRITERS_AT_ONCE = 32
# Reads `Store.read_async` runs at once in a process, by default (each a request on object
# stores, latency bound); a backend whose reads cost this process CPU sets fewer.
READERS_AT_ONCE = 32


def concurrently(fn: Callable[[Any], object], args: Sequence[Any],
                 at_once: int) -> list[BaseException | None]:
    """``fn(arg)`` for every arg, on at most ``at_once`` threads; returns once every call
    ended, with each call's exception (None where it returned), in order.

    The threads are daemons: a batch a deadline abandoned (`DeadlineStore` runs the whole
    call on a thread it leaves behind) never holds up the interpreter's exit while a
    request of it waits on a server that does not answer."""
    errors: list[BaseException | None] = [None] * len(args)
    todo = iter(enumerate(args))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                step = next(todo, None)
            if step is None:
                return
            i, arg = step
            try:
                fn(arg)
            except BaseException as exc:  # reported to the caller, in order
                errors[i] = exc

    threads = [threading.Thread(target=work, name="ckpt-store-batch", daemon=True)
               for _ in range(min(at_once, len(args)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# Reader threads of `Store.read_async`, one pool per backend and bucket (a disk, a
# server), so that reads abandoned on one that stopped answering never queue another's.
_READS: dict[tuple[str, str], queue.SimpleQueue[Any]] = {}
_READS_LOCK = threading.Lock()


def _forget_readers() -> None:
    # A child after a fork has none of the threads, and maybe a lock held by one.
    global _READS_LOCK
    _READS_LOCK = threading.Lock()
    _READS.clear()


os.register_at_fork(after_in_child=_forget_readers)


def _submit(pool: tuple[str, str], threads: int,
            fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    """``fn()`` on one of the ``threads`` reader threads of ``pool`` (started at its first
    call); its future."""
    with _READS_LOCK:
        work = _READS.get(pool)
        if work is None:
            work = _READS[pool] = queue.SimpleQueue()
            for _ in range(threads):
                threading.Thread(target=_serve, args=(work,), name="ckpt-store-read",
                                 daemon=True).start()
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    work.put((future, fn))
    return future


def _serve(work: queue.SimpleQueue[Any]) -> None:
    # Daemon threads, unlike a ThreadPoolExecutor's (which the interpreter joins at exit): a
    # read left behind on a server that never answers does not hold up the process's exit.
    while True:
        future, fn = work.get()
        if future.set_running_or_notify_cancel():  # else cancelled while queued (`settle`)
            try:
                future.set_result(fn())
            except BaseException as exc:  # the reader's to take, through the future
                future.set_exception(exc)
        # Nothing of the read outlives it here while this thread waits for the next: its
        # result (a reader's chunk buffer) is the reader's to let go.
        del future, fn


_CONTEXTS: dict[str, ts.Context] = {}


def shared_context(name: str, spec: dict[str, Any] | None = None) -> ts.Context:
    """The one TensorStore context of this process called ``name``, made from ``spec`` the
    first time it is asked for; every store of a backend (and of its settings, which the
    name includes) asks for the same one.

    The one policy for contexts: sharing one per backend shares TensorStore's concurrency
    limits, connection pools and caches, and for ``memory://`` the data itself, which lives
    in the context.
    """
    with _CONTEXT_LOCK:
        if name not in _CONTEXTS:
            _CONTEXTS[name] = ts.Context(spec or {})
        return _CONTEXTS[name]


# `Store.list` shadows the built-in inside the class body.
Keys = list[str]


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Validates a relative key and returns it without a trailing ``/``.

    Raises:
        InvalidKeyError: an absolute key, an empty or ``.``/``..`` segment, a NUL byte or a
            backslash.
    """
    if key.endswith("/"):
        key = key[:-1]
    if key == "" and allow_empty:
        return key
    bad = (
        key == ""
        or key.startswith("/")
        or "\x00" in key
        or "\\" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    )
    if bad:
        raise InvalidKeyError(f"invalid storage key {key!r}: keys are relative, '/'-separated, "
                              "with no empty, '.' or '..' segments, NUL or backslash")
    return key


class Op(enum.StrEnum):
    """What a store call does, as `WrapperStore._delegate` is told: a wrapper matches these,
    never the wording of a message. Each value is the words errors use for it."""

    CHECK_ACCESS = "checking access to"
    OPEN = "opening"  # an array's TensorStore spec
    READ = "reading"
    LIST = "listing"
    CHECK_FILES = "looking at the files under"
    WRITE = "writing"
    CREATE = "creating"  # a conditional create (COMMIT, claims)
    LOOK_UP = "looking up"
    DELETE = "deleting"
    PRUNE = "removing"  # empty folders
    SYNC = "making durable the writes under"  # `Store.sync`


@dataclasses.dataclass(frozen=True)
class ChunkIO:
    """A chunk, or a byte range of a file, moving between TensorStore and a store: what
    `Store.wait` is told about the future it waits for, so that a wrapper can match it by
    its fields. ``str()`` gives the words errors use (``reading chunk (0, 1) of ['w']``).

    ``op``: `Op.READ` or `Op.WRITE`; ``leaf``: the leaf's key path (empty where the waiter
    does not know it); ``coord``: the chunk's grid index; ``byte_range``: [begin, end) of
    ``key`` for a read of plain bytes (a safetensors tensor).
    """

    op: Op
    leaf: str = ""
    coord: tuple[int, ...] | None = None
    byte_range: tuple[int, int] | None = None
    key: str = ""

    def __str__(self) -> str:
        if self.byte_range is not None:
            begin, end = self.byte_range
            return f"reading bytes {begin}-{end} of {self.key} for {self.leaf}"
        if self.op == Op.WRITE:
            return "writing chunks"
        return f"reading chunk {self.coord} of {self.leaf}"


class Store(abc.ABC):
    """A small object store rooted at one location.

    All methods may be called from any thread; they block until the operation is complete
    (and, for writes, durable as far as the backend offers durability).
    """

    # Reads `read_async` runs at once, on threads shared by the stores of a backend.
    readers_at_once = READERS_AT_ONCE

    def __init__(self, location: Location) -> None:
        self.location = location

    @property
    def url(self) -> str:
        """The canonical URL of this store's root."""
        return self.location.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def child(self, prefix: str) -> Store:
        """A store of the same backend rooted at ``prefix`` below this root."""
        return type(self)(self.location.child(check_key(prefix)))

    def parent(self) -> Store | None:
        """A store of the same backend rooted one level up (None at the top): where a
        reader of a single file (a ``.safetensors`` URL) finds it by name."""
        up = self.location.parent()
        return None if up is None else type(self)(up)

    def describe(self, key: str) -> str:
        """A human-readable name of ``key`` for error messages."""
        return f"{self.url.rstrip('/')}/{key}" if key else self.url

    def verify_access(self) -> None:  # noqa: B027  (a default: most stores check nothing)
        """Checks that the store is reachable with the configured credentials.

        Called by `CheckpointManager` and by process 0 at the start of a save, so that a
        missing bucket or a bad credential fails before any training time is spent. Local
        and memory stores have nothing to check.

        Raises:
            AccessDeniedError: credentials missing, wrong or insufficient (names the bucket).
            BucketNotFoundError: the bucket does not exist.
        """

    # Public methods validate keys, then delegate to the backend's `_methods`.

    def read(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """Returns the whole object at ``key``.

        ``max_bytes`` bounds what is read (and held in memory) while reading, not after: an
        object of untrusted size is never read whole.

        Raises:
            ObjectNotFoundError: no object at ``key``.
            UnreadableObjectError: the object is over ``max_bytes``, or not a regular file.
        """
        data = self._read(check_key(key), max_bytes)
        if max_bytes is not None and len(data) > max_bytes:
            raise self._too_large(key, max_bytes)
        return data

    def read_async(self, key: str, *, max_bytes: int, into: memoryview | None = None
                   ) -> concurrent.futures.Future[bytes | memoryview]:
        """Starts `read` of ``key`` (with ``max_bytes``) on a reader thread the stores of
        this backend and bucket share (`readers_at_once` of them) and returns its future,
        whose outcome is `read`'s. For readers of objects read whole (restore's single-chunk
        arrays and, on a local disk, chunks it copies into several boxes:
        `ckpt.restore.read_arrays`); on a local file system the read itself refuses what is
        not a regular file, so nothing is looked at before it.

        ``into`` (a writable buffer of at least ``max_bytes``): the object is read into it,
        and the outcome is the part of it the object filled. A reader that reuses its
        buffers saves a fresh allocation, and its page faults, per object: a local file is
        read straight into it; other backends copy what they read.

        The caller waits through `wait` with a `ChunkIO`: that wait, like a TensorStore
        chunk read's, is what a wrapper store sees of it (and bounds by its deadline); the
        read itself is not a `_delegate`d `Op.READ`.
        """
        check_key(key)
        if into is not None and len(into) < max_bytes:
            raise ValueError(f"a buffer of {len(into)} bytes cannot take {max_bytes}")
        target = None if into is None else into[:max_bytes]

        def read() -> bytes | memoryview:
            if target is None:
                return self.read(key, max_bytes=max_bytes)
            return target[:self._read_into(key, target)]

        return _submit((self.location.scheme, self.location.bucket), self.readers_at_once,
                       read)

    def _read_into(self, key: str, buffer: memoryview) -> int:
        """Reads the object at ``key`` into ``buffer``; returns its size. Raises as `read`
        with ``max_bytes`` the buffer's size. A backend that can read into a buffer without
        a copy overrides it."""
        data = self.read(key, max_bytes=len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _too_large(self, key: str, max_bytes: int) -> UnreadableObjectError:
        return UnreadableObjectError(errno.EFBIG, f"{self.describe(key)} is over {max_bytes} "
                                                  "bytes, the most a reader takes for it")

    def check_plain_files(self, prefix: str, keys: Sequence[str] | None = None) -> None:
        """Raises `UnreadableObjectError` if anything below ``prefix`` is not a regular file
        (a FIFO, socket or device in a checkpoint folder would block a reader forever).
        Called by readers before TensorStore opens files there; only file systems can hold
        such things, so other backends do nothing. ``keys`` (relative to ``prefix``): check
        only these, each where it exists (what a reader will open: one ``stat`` each
        instead of a listing of every folder below ``prefix``)."""
        self._check_plain_files(check_key(prefix, allow_empty=True),
                                None if keys is None else [check_key(k) for k in keys])

    def _check_plain_files(self, prefix: str, keys: list[str] | None) -> None:
        return None

    def write(self, key: str, data: bytes) -> None:
        """Creates or atomically replaces the object at ``key``."""
        self._write(check_key(key), bytes(data))

    def write_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Creates or atomically replaces each object ``key`` with its ``data``, for many
        small objects at once (an attempt's ``zarr.json`` files); every one is durable when
        this returns. Called by the save path on the process that writes them, never
        concurrently with a write of the same keys.

        Each object is replaced atomically, as by `write`; the batch is not: after a failure
        or a crash, any subset may be there. Backends write them concurrently; the local
        file system makes them durable with one sync of the file system where it can. A
        wrapper store sees the batch as one call (`Op.WRITE` of the objects' common prefix).
        """
        checked = [(check_key(key), bytes(data)) for key, data in items]
        if checked:
            self._write_many(checked)

    def _write_many(self, items: list[tuple[str, bytes]]) -> None:
        # A backend without a batch of its own: each object is one `_write`.
        for error in concurrently(lambda item: self._write(*item), items, WRITERS_AT_ONCE):
            if error is not None:
                raise error

    def write_stream(self, key: str, parts: Iterable[bytes | memoryview]) -> int:
        """Creates or atomically replaces the object at ``key`` with the concatenation of
        ``parts``, written as they come: an object larger than memory is never held whole.
        Called by offline exports (`ckpt.export_safetensors`), on one process.

        Readers see the old object (or none) until every part is written and durable, then
        the new one. If iterating ``parts`` raises, or a write fails, nothing is created or
        replaced and the error propagates.

        Returns:
            The bytes written.
        """
        return self._write_stream(check_key(key), parts)

    def _write_stream(self, key: str, parts: Iterable[bytes | memoryview]) -> int:
        data = b"".join(bytes(p) for p in parts)  # backends that can stream override this
        self._write(key, data)
        return len(data)

    def write_if_absent(self, key: str, data: bytes) -> bool:
        """Creates ``key`` only if no object is there, atomically.

        Of any number of concurrent callers on any number of machines, exactly one gets True.

        Returns:
            True if this call created the object, False if one already existed (unchanged).
        """
        return self._write_if_absent(check_key(key), bytes(data))

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""
        return self._exists(check_key(key))

    def list(self, prefix: str = "") -> Keys:
        """All keys below ``prefix`` (recursively), sorted, relative to the root."""
        return sorted(self._list(check_key(prefix, allow_empty=True)))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """Like `list`, with each object's size in bytes (for tools: `ckpt list`, `gc`)."""
        return dict(sorted(self._list_sizes(check_key(prefix, allow_empty=True)).items()))

    def list_children(self, prefix: str = "") -> Keys:
        """The names directly below ``prefix``: objects and sub-prefixes alike, sorted."""
        return sorted(set(self._list_children(check_key(prefix, allow_empty=True))))

    def delete(self, key: str) -> None:
        """Deletes the object at ``key``; a missing object is not an error."""
        self._delete(check_key(key))

    def delete_prefix(self, prefix: str) -> None:
        """Deletes every object below ``prefix`` (which must not be the root)."""
        self._delete_prefix(check_key(prefix))

    def prune(self, prefix: str = "") -> None:
        """Removes the folder at ``prefix`` (default: this root) if it is empty.

        Only file systems have folders; on object stores and in memory there is nothing to
        do. Never removes anything that holds an object, so it cannot race a writer.
        """
        self._prune(check_key(prefix, allow_empty=True))

    def _prune(self, prefix: str) -> None:
        return None

    def kvstore_spec(self, prefix: str = "", *, sync_later: bool = False) -> dict[str, Any]:
        """The TensorStore kvstore spec addressing ``prefix`` below this root.

        Keys written through TensorStore with this spec are the same objects this store reads.
        ``sync_later``: for writes whose writer calls `sync` once after all of them (a
        save's chunks, before its host report): a backend may then leave each write's
        durability to `sync` (a local file system that one ``syncfs`` makes durable).
        """
        spec = self._kvstore_spec(check_key(prefix, allow_empty=True))
        if sync_later:
            spec.update(self._sync_later_options())
        return spec

    def _sync_later_options(self) -> dict[str, Any]:
        """What `kvstore_spec` adds for ``sync_later`` writes: nothing, where each write is
        durable once acknowledged (object stores, memory)."""
        return {}

    def sync(self) -> None:
        """Makes durable every write made through a ``sync_later`` `kvstore_spec` of this
        store that has completed. Called by the chunk writer (`ckpt._attempt.ChunkWriter`)
        on the writing thread, once its chunks are written and before its host report."""
        self._sync()

    def _sync(self) -> None:
        return None

    @abc.abstractmethod
    def _read(self, key: str, max_bytes: int | None) -> bytes:
        """The object's bytes; with ``max_bytes``, at most ``max_bytes + 1`` of them."""

    @abc.abstractmethod
    def _write(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _write_if_absent(self, key: str, data: bytes) -> bool: ...

    @abc.abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> Keys: ...

    @abc.abstractmethod
    def _list_sizes(self, prefix: str) -> dict[str, int]: ...

    @abc.abstractmethod
    def _list_children(self, prefix: str) -> Keys: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def _delete_prefix(self, prefix: str) -> None: ...

    @abc.abstractmethod
    def _kvstore_spec(self, prefix: str) -> dict[str, Any]: ...

    def wait(self, future: Any, doing: str | ChunkIO) -> Any:
        """The result of a TensorStore ``future`` on this store's data: ``doing`` is a
        `ChunkIO` for a chunk or byte range, else words naming it for errors (``opening
        leaf ['w']``); a `DeadlineStore` waits only until its deadline."""
        return future.result()

    def tensorstore_context(self) -> ts.Context:
        """The TensorStore context arrays of this store are opened with.

        One context per process is shared by every store of a backend (`shared_context`);
        backends with settings of their own override this.
        """
        return shared_context(self.location.scheme)
