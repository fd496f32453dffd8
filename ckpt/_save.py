"""Asynchronous save: snapshot on the caller's thread, write and commit in the background.

Order of work for one save (every process runs the same code; see docs/protocol.md):

1. Caller's thread (`start_save`): flatten and classify the tree, agree on the attempt id
   (process 0 proposes it; it also refuses a URL that already holds a COMMIT), plan chunk
   ownership from the shardings, and take the snapshot: host views (CPU) or device-to-host
   copies (accelerators, all started before any is awaited) of the chunks this process owns.
   The caller may donate or delete its arrays as soon as this returns.
2. Background thread (`_run`): write owned chunks with TensorStore (bounded bytes in flight),
   write ``hosts/<p>.msgpack``, meet at a barrier; process 0 checks every expected chunk was
   reported by its planned writer, writes the manifest, then creates COMMIT if absent and
   publishes the outcome, which the other processes wait for.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours; see below)
import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ckpt import _coord
from ckpt._agreement import digests
from ckpt._attempt import (
    ChunkWriter,
    Row,
    commit_attempt,
    new_attempt_id,
    open_arrays,
    refusal_if_committed,
    write_report,
)
from ckpt._format import ChunkLayout, LeafKind, LeafRecord, pack, unpack
from ckpt._claims import COMMITTING, claim_kind
from ckpt._commit import committed_attempt
from ckpt._leaves import classify, encode_inline, is_typed_key
from ckpt._ownership import ArrayInput, ArrayPlan, plan
from ckpt._snapshot import DEFAULT_MEMORY_BUDGET, Snapshot, checked_options, start_fetching, take
from ckpt._tree import flatten, keystr
from ckpt import errors as _errors
from ckpt.errors import (
    CkptError,
    CommitOutcomeUnknownError,
    CoordinationError,
    InvalidMetadataError,
    SaveError,
    UnsupportedLeafError,
)
from ckpt.storage import Deadline, DeadlineStore, Store, StoreLike, open_store

_SAVE_SEQ = itertools.count()
_REFUSED = "!refused:"

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

    @classmethod
    def of(cls, job: "_Job", written: float, rows: list[Row], nbytes: int) -> "SaveTimings":
        """A committed save's timings, now (``written``: when its writes ended)."""
        done = time.monotonic()
        return cls(blocked_s=job.blocked_s, write_s=written - job.started - job.blocked_s,
                   commit_s=done - written, total_s=done - job.started, nbytes=nbytes,
                   written_bytes=sum(row[2] for row in rows), leaves=len(job.records),
                   snapshot=job.snapshot.mode, host_peak_bytes=job.snapshot.feed.peak
                   if job.snapshot.feed is not None else 0)

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

    def _finish(self, exc: BaseException | None) -> None:
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

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Blocks like `wait`, then returns the save's error instead of raising it."""
        if not self._await(timeout):
            raise TimeoutError(f"save to {self.url} still running after {timeout} s")
        self.mark_observed()
        return self._exc


_LIVE: set[SaveHandle] = set()
_LIVE_LOCK = threading.Lock()


def _finish_saves_at_exit() -> None:
    """Lets every save in flight commit before the interpreter shuts down.

    Registered with `threading._register_atexit`, after `concurrent.futures` registered its
    own hook: such hooks run newest first, so this one runs while thread pools (which the
    storage clients use) still accept work, and before non-daemon threads are joined. A save
    that fails or is interrupted here (a second Ctrl-C) gets one line on stderr naming it;
    this is the one place the library writes to stderr, because logging may be gone by now.
    """
    with _LIVE_LOCK:
        pending = sorted(_LIVE, key=lambda h: h.url)
    for handle in pending:
        try:
            exc = handle.outcome()
        except KeyboardInterrupt:
            sys.stderr.write(f"ckpt: exiting before {handle.describe()} was committed: it is "
                             "not a checkpoint; `ckpt gc` removes what it wrote\n")
            continue
        if exc is not None and not handle.observed_by_user:
            handle.mark_observed()
            sys.stderr.write(f"ckpt: {handle.describe()} was not committed: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n")


try:
    threading._register_atexit(_finish_saves_at_exit)  # type: ignore[attr-defined]
except AttributeError:  # an interpreter without it: atexit runs after threads are joined
    import atexit

    atexit.register(_finish_saves_at_exit)


@dataclasses.dataclass
class _Job:
    store: DeadlineStore
    coord: _coord.Coordinator
    seq: int
    attempt: str
    created_at: float
    metadata: Any
    records: list[LeafRecord]
    plans: dict[int, ArrayPlan]
    snapshot: Snapshot
    timeout_s: float
    deadline: Deadline  # from `timeout_s`; `store` is bound by it
    memory_budget: int
    on_commit: Callable[[], None] | None
    overwrite: bool
    metrics: dict[str, float]
    digests: tuple[str, dict[str, int]]  # `ckpt._agreement`; empty for one process
    # This process's value of each per-process leaf, by leaf position (its host report's).
    per_process: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
    prefix: str = ""  # of its coordination keys: the same on every process
    started: float = 0.0   # time.monotonic() when save_async was called
    blocked_s: float = 0.0
    blocked: threading.Event = dataclasses.field(default_factory=threading.Event)  # returned


def _host_array(leaf: jax.Array) -> np.ndarray:
    if leaf.sharding.is_fully_replicated:
        return np.array(leaf.addressable_shards[0].data, copy=True)
    return np.array(leaf, copy=True)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: the blocking part of a save allocates tens of
    objects a leaf and none of them cyclic, so a collection there (~0.1 s with a large
    heap, triggered by the allocations alone) would only lengthen the caller's wait."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _classify(tree: Any, process_count: int) -> tuple[list[LeafRecord], list[Any]]:
    """The tree's leaf records (`classify`) and the leaves to save, typed PRNG keys as
    their key data. Raises `UnsupportedLeafError` for two leaves that map to one array."""
    pairs, _ = flatten(tree)
    records = [classify(path, leaf, process_count) for path, leaf in pairs]
    leaves = [jax.random.key_data(leaf) if is_typed_key(leaf) else leaf for _, leaf in pairs]
    names: dict[str, LeafRecord] = {}
    for rec in records:
        if rec.kind == LeafKind.ARRAY:
            other = names.setdefault(rec.name, rec)
            if other is not rec:
                raise UnsupportedLeafError(
                    f"leaves {keystr(other.path)} and {keystr(rec.path)} map to the same "
                    f"array name {rec.name!r}")
    return records, leaves


def _agree_on_attempt(store: Store, coord: _coord.Coordinator, seq: int, timeout_s: float, *,
                      overwrite: bool, refuse: Callable[[], CkptError | None] | None,
                      on_attempt: Callable[[str], None] | None) -> str:
    """The attempt id every process of save ``seq`` writes under, drawn by process 0.

    Every reason not to save is decided by process 0 and sent to all processes in place of
    the id, so that no process waits for a save process 0 refused: each raises it.
    """
    proposal = None
    refusal: CkptError | None = None
    if coord.process_index == 0:
        try:
            store.verify_access()
            refusal = refuse() if refuse is not None else None
            if refusal is None:
                refusal = refusal_if_committed(store, overwrite=overwrite,
                                               how="pass overwrite=True")
        except CkptError as exc:
            refusal = exc
        proposal = (new_attempt_id() if refusal is None
                    else f"{_REFUSED}{type(refusal).__name__}:{refusal}")
        if refusal is None and on_attempt is not None:
            on_attempt(proposal)  # before any process can write under it
    attempt: str = coord.broadcast(f"save/{seq}/attempt", proposal, timeout_s)
    if refusal is not None:
        raise refusal
    if attempt.startswith(_REFUSED):
        name, _, message = attempt[len(_REFUSED):].partition(":")
        cls = getattr(_errors, name, None)
        raise (cls if isinstance(cls, type) and issubclass(cls, CkptError) else CkptError)(message)
    return attempt


def _plan_chunks(records: list[LeafRecord], leaves: list[Any],
                 coord: _coord.Coordinator) -> dict[int, ArrayPlan]:
    """Plans every array leaf's chunks and writers (`plan`, the same on every process) and
    attaches each plan's layout to its record, in place."""
    array_ids = [i for i, rec in enumerate(records) if rec.kind == LeafKind.ARRAY]
    inputs = [ArrayInput(records[i].shape, np.dtype(leaves[i].dtype).itemsize,
                         leaves[i].sharding if isinstance(leaves[i], jax.Array) else None)
              for i in array_ids]
    plans = dict(zip(array_ids, plan(inputs, coord.process_index, coord.process_count)))
    for i, arr, p in zip(array_ids, inputs, plans.values()):
        records[i] = dataclasses.replace(records[i], layout=ChunkLayout.planned(
            p.chunk_shape, p.writers, p.chunk_nbytes(arr.itemsize)))
    return plans


def start_save(store: Store, tree: Any, *, metadata: Any = None,
               on_commit: Callable[[], None] | None = None,
               timeout_s: float = _coord.DEFAULT_TIMEOUT_S,
               memory_budget: int = DEFAULT_MEMORY_BUDGET,
               snapshot: str = "auto",
               overwrite: bool = False,
               metrics: dict[str, float] | None = None,
               refuse: Callable[[], CkptError | None] | None = None,
               on_attempt: Callable[[str], None] | None = None,
               step: int | None = None) -> SaveHandle:
    """Runs the blocking part of a save and starts its background part.

    Called by `ckpt.save_async` and `CheckpointManager.save`, on every process of the job, in
    the same order with trees of the same structure and shardings. ``refuse`` runs on
    process 0 only, before an attempt id is proposed; an error it returns is raised on every
    process. ``on_attempt`` runs on process 0 with the attempt id before it is sent to any
    process, so before anything is written under it. ``on_commit`` runs on every process
    once the save is committed; its errors are logged, never raised: the checkpoint is
    committed whatever it does.
    """
    memory_budget = checked_options(snapshot, memory_budget)
    coord = _coord.current()
    created_at = time.time()
    started = time.monotonic()
    deadline = Deadline(timeout_s, f"saving {store.url}")
    store = DeadlineStore(store, deadline)
    with _gc_paused():
        records, leaves = _classify(tree, coord.process_count)
    # Each process's own values of per-process leaves travel in its host report; process 0
    # gathers them into the manifest (`ckpt._attempt.check_reports`).
    per_process = [(i, rec.value) for i, rec in enumerate(records)
                   if rec.kind == LeafKind.PER_PROCESS]
    for i, _ in per_process:
        records[i] = dataclasses.replace(records[i], value=None)
    metadata = plain_metadata(metadata, store.url)
    seq = next(_SAVE_SEQ)
    attempt = _agree_on_attempt(store, coord, seq, timeout_s, overwrite=overwrite,
                                refuse=refuse, on_attempt=on_attempt)
    with _gc_paused():
        plans = _plan_chunks(records, leaves, coord)
        taken = take(leaves, plans, snapshot, memory_budget)
    agreement = digests(records, leaves) if coord.process_count > 1 else ("", {})
    if coord.process_index == 0:
        for i, (rec, leaf) in enumerate(zip(records, leaves)):
            if rec.kind == LeafKind.INLINE:
                host = _host_array(leaf) if isinstance(leaf, jax.Array) else np.asarray(leaf)
                records[i] = dataclasses.replace(rec, data=encode_inline(host))

    handle = SaveHandle(store.url, step)
    handle.attempt = attempt
    job = _Job(store, coord, seq, attempt, created_at, metadata, records, plans, taken,
               timeout_s, deadline, memory_budget, on_commit, overwrite, dict(metrics or {}),
               agreement, per_process)
    job.started, job.prefix = started, f"save/{seq}"
    start_background(job, handle, lambda: _run(job, handle), f"ckpt-save-{attempt}")
    log.info("saving %s: %d leaves, %.1f MiB; snapshot %s; blocked %.3f s", handle.describe(),
             len(records), sum(r.nbytes for r in records) / 2**20, taken.mode, job.blocked_s)
    return handle


def plain_metadata(metadata: Any, where: str) -> Any:
    """A copy of a save's ``metadata`` (changes the caller makes after the save returns are
    not saved, like the tree's), checked to be plain msgpack data.

    Raises:
        InvalidMetadataError: naming ``where`` and what is not plain data.
    """
    try:
        return unpack(pack(metadata), "metadata")
    except (TypeError, ValueError, OverflowError, CkptError) as exc:
        raise InvalidMetadataError(
            f"metadata for {where} is not plain msgpack data (dicts, lists, str, bytes, "
            f"numbers, bool, None): {exc}") from exc


def start_background(job: _Job, handle: SaveHandle, run: Callable[[], None],
                     name: str) -> None:
    """The caller's thread, last step of a save (`start_save`, a local tier's save): lists
    the handle as live, starts ``run`` (the background part) on its own thread and, on the
    ``host`` path, moves the caller's shards to host now, as the budget lets the writes make
    room (an error doing so fails the save through its handle)."""
    with _LIVE_LOCK:
        _LIVE.add(handle)
    try:
        threading.Thread(target=run, name=name).start()
        if job.snapshot.mode == "host":
            job.snapshot.fetch()
    finally:
        job.blocked_s = time.monotonic() - job.started
        job.blocked.set()


def write_snapshot(job: _Job, create: bool) -> list[Row]:
    """The background part's writes, on every process: the snapshot's chunks (fetched by a
    thread of their own on the ``device`` path), then the snapshot released; returns the
    host-report rows. A failed write cancels the fetching; whoever fetches (a thread of
    ours, or the caller's on the host path) stops before the snapshot is released."""
    join = start_fetching(job.snapshot, f"ckpt-fetch-{job.attempt}")
    try:
        try:
            rows = _write_chunks(job, create)
        except BaseException as exc:
            if job.snapshot.feed is not None:
                job.snapshot.feed.cancel(exc)
            raise
    finally:
        if join is not None:
            join()
        job.blocked.wait()
    job.snapshot.release()
    return rows


def _write_chunks(job: _Job, create: bool) -> list[Row]:
    """Writes this process's chunks; returns its host-report rows. ``create``: this
    process writes each array's ``zarr.json`` (process 0 of a save; each process of a
    local copy, which is its alone)."""
    arrays = open_arrays(job.store, job.attempt,
                         {r: job.records[r] for r in job.plans if create or job.plans[r].owned},
                         create=create)
    writer = ChunkWriter(job.store, job.memory_budget)
    feed = job.snapshot.feed
    try:
        for unit, host in job.snapshot.items(job.deadline, writer.finish_oldest):
            last = len(unit.chunks) - 1
            for i, c in enumerate(unit.chunks):
                release = (functools.partial(feed.release, unit.nbytes)
                           if feed is not None and i == last else None)
                writer.put(arrays[c.record], c.slices, c.data(host),
                           job.records[c.record].name, c.flat, release)
            del host  # the unit's host copies go once TensorStore holds its own
    except BaseException:
        host = None  # noqa: F841  (the error keeps this frame alive, not its host copies)
        raise
    return writer.finish()


# How long past their deadline processes other than 0 wait for process 0's verdict, which
# comes at its own deadline at the latest (the deadlines start within one broadcast).
OUTCOME_GRACE_S = 5.0

def _outcome(job: _Job, prefix: str) -> str:
    """Processes other than 0: the outcome process 0 published, ``ok`` if it committed.

    Process 0's commit can outlast ``timeout_s`` (a slow store); processes must not then
    disagree about whether the save committed. So a process that stops waiting asks COMMIT:
    if it names this attempt, the save committed; if not, it cannot know (process 0 may still
    create it) and says so.
    """
    try:
        # Process 0 runs to the same deadline: the grace lets its verdict arrive.
        return job.coord.wait_for(f"{prefix}/outcome",
                                  job.deadline.remaining() + OUTCOME_GRACE_S)
    except CoordinationError as exc:
        store = job.store.inner  # past the deadline: each request's own deadline bounds these
        try:
            holder = committed_attempt(store)
        except CkptError:  # no COMMIT, or none readable now: nothing says it committed
            holder = None
        if holder == job.attempt and claim_kind(store, job.attempt) == COMMITTING:
            log.warning("process 0 did not report within %.0f s, but %s is committed",
                        job.timeout_s, job.store.url)
            return "ok"
        raise CommitOutcomeUnknownError(
            f"process 0 did not report the outcome of saving {job.store.url} within "
            f"{job.timeout_s:.0f} s and COMMIT does not name attempt {job.attempt} yet; "
            f"process 0 may still commit it: the checkpoint's COMMIT decides (latest_step, "
            f"restore)") from exc


def _run(job: _Job, handle: SaveHandle) -> None:
    """The background part of a save, on its own thread, on every process.

    A process whose writes fail still arrives at the barrier, having published its error,
    so that process 0 fails the save at once, naming it, instead of waiting for a timeout.
    """
    me = job.coord.process_index
    prefix = job.prefix
    try:
        try:
            rows = write_snapshot(job, create=me == 0)
            log.debug("%s: chunks written (%d)", handle.describe(), len(rows))
            write_report(job.store, job.attempt, me, rows, job.digests, job.per_process)
            written = time.monotonic()
        except BaseException as exc:
            job.coord.publish(f"{prefix}/failed/{me}", f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(CkptError):  # this process's own error is the one to see
                job.coord.barrier(f"{prefix}/written", job.deadline.remaining())
            raise
        job.coord.barrier(f"{prefix}/written", job.deadline.remaining())
        log.debug("%s: every process wrote its chunks", handle.describe())
        if me == 0:
            try:
                failures = job.coord.collect(f"{prefix}/failed/")
                if failures:
                    raise SaveError("; ".join(
                        f"process {k.rsplit('/', 1)[-1]} failed to write: {v}"
                        for k, v in sorted(failures.items())))
                commit_attempt(job.store, job.attempt, job.records,
                               process_count=job.coord.process_count, metadata=job.metadata,
                               created_at=job.created_at, overwrite=job.overwrite,
                               metrics=job.metrics)
            except BaseException as exc:
                job.coord.publish(f"{prefix}/outcome", f"{type(exc).__name__}: {exc}")
                raise
            job.coord.publish(f"{prefix}/outcome", "ok")
        else:
            outcome = _outcome(job, prefix)
            if outcome.startswith(f"{CommitOutcomeUnknownError.__name__}:"):
                raise CommitOutcomeUnknownError(f"process 0 reported: {outcome}")
            if outcome != "ok":
                raise SaveError(f"process 0 did not commit {job.store.url}: {outcome}")
        handle.timings = timings = SaveTimings.of(job, written, rows,
                                                  sum(r.nbytes for r in job.records))
        log.info("committed %s: %.1f MiB in %d leaves; blocked %.3f s, write %.3f s, "
                 "commit %.3f s, total %.3f s (%.0f MiB/s)", handle.describe(),
                 timings.nbytes / 2**20, timings.leaves, timings.blocked_s, timings.write_s,
                 timings.commit_s, timings.total_s, timings.mib_per_s)
        if job.on_commit is not None:
            try:
                job.on_commit()
            except Exception:
                log.exception("after committing %s: housekeeping failed (the checkpoint is "
                              "committed; it is retried after the next commit)", job.store.url)
        handle._finish(None)
    except CkptError as exc:
        handle._finish(exc)
    except BaseException as exc:
        error = SaveError(f"saving {job.store.url} (attempt {job.attempt}, process {me}) "
                          f"failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        handle._finish(error)
    finally:
        # A failed save's error (kept until someone sees it) holds this frame through its
        # traceback: the snapshot must not stay alive with it.
        job.snapshot.release()


def save_async(url: StoreLike, tree: Any, *, metadata: Any = None,
               timeout_s: float = _coord.DEFAULT_TIMEOUT_S,
               overwrite: bool = False, snapshot: str = "auto",
               memory_budget: int = DEFAULT_MEMORY_BUDGET) -> "SaveHandle":
    """Starts saving ``tree`` to ``url``; returns once the snapshot is taken.

    Call on every process of the job with the same URL and a tree of the same structure.

    Args:
        url: a path or URL where no committed checkpoint exists yet.
        tree: a pytree of jax.Arrays, numpy arrays, Python scalars and strings, and None.
        metadata: plain msgpack data (dicts, lists, str, numbers, bool, None) stored in the
            manifest and returned by `ckpt.metadata`.
        timeout_s: the bound on the whole save, in seconds, from this call to the commit
            (raise it for saves that take longer: the default is 600). Waits for other
            processes end with it (a process that does not arrive fails the save on the
            others with an error naming it), and so do storage requests (one under way is
            abandoned): the save fails with `DeadlineExceededError` naming the URL and what
            was under way. Creating COMMIT, once begun, is never abandoned: it ends within
            its own request deadlines (docs/protocol.md, "Deadlines").
        overwrite: replace a committed checkpoint at ``url``. The old one stays readable
            until the new one commits; then COMMIT is replaced atomically and the old
            attempt deleted.
        snapshot: how the arrays are copied before this returns (docs/performance.md,
            "The snapshot on accelerators"). ``"auto"``: on CPU a zero-copy view; on
            accelerators an on-device copy of the owned shards when every device has the
            memory for it (this returns once the copies are made, and they go to host in
            the background), else ``"host"``. ``"device"``: the on-device copy, unchecked.
            ``"host"``: device-to-host copies, made before this returns, within
            ``memory_budget`` (a larger state waits here for writes to make room).
        memory_budget: bytes of host memory for chunk data fetched from devices or handed
            to storage and not yet durable (one shard is always let through, however
            large). Default 1 GiB.

    Raises:
        UnsupportedLeafError: a leaf cannot be saved (its key path is named).
        CheckpointExistsError: ``url`` already holds a committed checkpoint (and not
            ``overwrite``).
    """
    return start_save(open_store(url), tree, metadata=metadata, timeout_s=timeout_s,
                      overwrite=overwrite, snapshot=snapshot, memory_budget=memory_budget)


def save(url: StoreLike, tree: Any, *, metadata: Any = None,
         timeout_s: float = _coord.DEFAULT_TIMEOUT_S, overwrite: bool = False,
         snapshot: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
    """Saves ``tree`` to ``url`` and returns once it is committed: `save_async` then `wait`."""
    save_async(url, tree, metadata=metadata, timeout_s=timeout_s, overwrite=overwrite,
               snapshot=snapshot, memory_budget=memory_budget).wait()
