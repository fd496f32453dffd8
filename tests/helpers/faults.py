"""A store that injects faults or observes calls, for tests: the library's own seam
(`ckpt.storage.WrapperStore`), passed to any entry point in place of a URL.

``before(doing, key, args)`` runs before each call of the wrapped store (``key`` relative
to the root the wrapper was made for, also in the stores below it: ``2/COMMIT`` for step 2
of a manager's root) and may block,
raise, or return replacement ``args`` (to tamper with what is written); ``after(doing, key,
args)`` runs once it returned. ``doing`` is the call's `ckpt.storage.Op` (`Op.READ`,
`Op.WRITE`, `Op.CREATE`, `Op.OPEN` for an array's TensorStore spec, `Op.LIST` ...): a fault
matches an operation, never a message's wording. TensorStore futures waited for through
the store come as a `ckpt.storage.ChunkIO` (its operation, leaf, chunk index or byte
range: `is_chunk_write`, `is_chunk_read`) or, for anything else, the waiter's words, and an
empty key.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, cast

from ckpt._claims import COMMITTING
from ckpt._format import CLAIMS, decode_host_report, encode_host_report, unpack
from ckpt.storage import ChunkIO, Op, StoreLike, WrapperStore, open_store

Before = Callable[[str, str, tuple], "tuple | None"]
After = Callable[[str, str, tuple], None]


class FaultyStore(WrapperStore):
    def __init__(self, inner: StoreLike, before: Before | None = None,
                 after: After | None = None) -> None:
        super().__init__(open_store(inner))
        self.before, self.after = before, after
        self.prefix = ""

    def child(self, prefix: str) -> "FaultyStore":
        # WrapperStore.child returns a copy of this store, so a FaultyStore.
        wrapped = cast(FaultyStore, super().child(prefix))
        wrapped.prefix = f"{self.prefix}{prefix.strip('/')}/"
        return wrapped

    def _delegate(self, doing, key, fn, *args):
        key = f"{self.prefix}{key}" if key else self.prefix.rstrip("/")
        if self.before is not None:
            replaced = self.before(doing, key, args)
            args = replaced if isinstance(replaced, tuple) else args
        result = fn(*args)
        if self.after is not None:
            self.after(doing, key, args)
        return result

    def wait(self, future, doing):
        return self._delegate(doing, "", self.inner.wait, future, doing)


def is_chunk_write(doing) -> bool:
    """A chunk being written (what a save's chunk writes are waited for as)."""
    return isinstance(doing, ChunkIO) and doing.op == Op.WRITE


def is_chunk_read(doing) -> bool:
    """A chunk, or a byte range of a plain file, being read."""
    return isinstance(doing, ChunkIO) and doing.op == Op.READ


def is_background(doing: str, key: str) -> bool:
    """A step of a save's background part that comes before its chunks are written (an
    array of the attempt being opened, or its ``arrays`` folder for plain chunks) or, for a
    save without array chunks, before its host report is."""
    return (doing == Op.OPEN and f"{key}/".find("/arrays/") >= 0) or (
        doing == Op.WRITE and "/hosts/" in key)


def fail_background(error: BaseException) -> Before:
    """Fails every save at its background part, before any chunk is written."""
    def before(doing, key, args):
        if is_background(doing, key):
            raise error
    return before


def is_commit_claim(doing: str, key: str, args: tuple) -> bool:
    """A committer's claim on its attempt, being created (a cleaner's claim is not one)."""
    return (doing == Op.CREATE and f"/{CLAIMS}/" in f"/{key}"
            and unpack(args[1], key).get("claim") == COMMITTING)


def hold_background(gate: Any) -> Before:
    """Holds every save at its background part, before any chunk is written, until ``gate``
    (a `threading.Event`) is set."""
    def before(doing, key, args):
        if is_background(doing, key):
            gate.wait()
    return before


def tamper_reports(change: Callable[[list], list]) -> Before:
    """Rewrites the rows of each host report as it is written."""
    def before(doing, key, args):
        if doing == Op.WRITE and "/hosts/" in key:
            _, data = args
            report = decode_host_report(data, key)
            report = dataclasses.replace(report, chunks=change([list(r) for r in report.chunks]))
            attempt = next(p for p in key.split("/") if p.startswith("attempt-"))
            return args[0], encode_host_report(attempt, report)
    return before


class ChunkReads:
    """Records every chunk a restore reads through the store it wraps: ``reads[leaf]`` is
    the list of chunk grid coordinates read of that leaf (its key path, e.g.
    ``params/w``), in the order they landed; ``ranges`` the byte ranges read of
    files stored as plain bytes (safetensors)."""

    def __init__(self) -> None:
        self.reads: dict[str, list[tuple[int, ...]]] = {}
        self.ranges: list[tuple[str, int, int]] = []  # (file, begin, end) of raw reads

    def _after(self, doing, key, args):
        if is_chunk_read(doing) and doing.byte_range is not None:
            self.ranges.append((doing.key, *doing.byte_range))
        elif is_chunk_read(doing):
            self.reads.setdefault(doing.leaf, []).append(doing.coord)

    def store(self, url: StoreLike) -> FaultyStore:
        return FaultyStore(url, after=self._after)


class ReadCounter(FaultyStore):
    """Counts what is read through it (its children share the counts): ``bytes`` of
    objects read, ``chunks`` read by TensorStore (restore waits on each chunk or byte range
    through its store), ``opened`` arrays or files TensorStore was pointed at."""

    def __init__(self, inner: StoreLike) -> None:
        super().__init__(inner)
        self.counts = {"bytes": 0, "chunks": 0, "opened": 0}

    def _delegate(self, doing, key, fn, *args):
        result = super()._delegate(doing, key, fn, *args)
        if doing == Op.READ:
            self.counts["bytes"] += len(result)
        elif is_chunk_read(doing):
            self.counts["chunks"] += 1
        elif doing == Op.OPEN:
            self.counts["opened"] += 1
        return result
