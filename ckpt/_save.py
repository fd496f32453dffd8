"""Asynchronous save: one pipeline for every copy of a step.

Order of work for one save (every process runs the same code; see docs/protocol.md):

1. Caller's thread (`start_save`): flatten and classify the tree, agree on the attempt id
   (process 0 proposes it, or the reason not to save, which every process raises), plan
   chunk ownership from the shardings, and take the snapshot of the chunks this process
   writes: host views (CPU) or device-to-host copies (accelerators, all started before any
   is awaited). The caller may donate or delete its arrays as soon as this returns.
2. Background thread (`run`): write the chunks with TensorStore (bounded bytes in flight),
   then every process publishes its outcome (`Coordinator.gather`), process 0 decides
   (`Coordinator.decide`), and every process learns the decision.

What differs between the copies of a step is a `Copy`, the pipeline's plug point: which
chunks this process writes and into which store, and who commits. `Copy` itself is the
persistent copy (each chunk written once by its owner, process 0 checks the host reports
and commits); the local tier's copy (`ckpt._local.LocalCopy`) has every process write every
chunk its devices hold and commit its own copy; the commit of a local step to the
persistent root (`ckpt._local.start_persist`) is a `Copy` whose snapshot is read back from
the local copy. Nothing else about claiming, fencing or committing an attempt differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
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
from ckpt._claims import (
    COMMITTING,
    REMOVED_BY_ANOTHER,
    REMOVING,
    claim_kind,
    remove_uncommitted,
)
from ckpt._codecs import canonical
from ckpt._commit import committed_attempt
from ckpt._format import ChunkLayout, LeafKind, LeafRecord, pack, unpack
from ckpt._handle import SaveHandle, SaveTimings, track
from ckpt._leaves import classify, encode_inline, is_typed_key
from ckpt._ownership import ArrayInput, ArrayPlan, plan
from ckpt._snapshot import DEFAULT_MEMORY_BUDGET, Snapshot, checked_options, start_fetching, take
from ckpt._tree import flatten, gc_paused, path_text
from ckpt.errors import (
    AttemptRemovedError,
    CkptError,
    CommitOutcomeUnknownError,
    CoordinationError,
    InvalidMetadataError,
    SaveCancelledError,
    SaveError,
    StorageError,
    UnsupportedLeafError,
)
from ckpt.storage import (
    Deadline,
    DeadlineStore,
    Store,
    StoreLike,
    causes,
    open_store,
    tensorstore_code,
)

__all__ = ["Copy", "Job", "SaveHandle", "SaveTimings", "save", "save_async", "start_save",
           "start_commit", "plain_metadata", "OUTCOME_GRACE_S"]

# Every save of this process (any copy) draws its coordination keys from one counter: every
# process starts saves in the same order, so the n-th save has the same keys everywhere.
_SAVE_SEQ = itertools.count()

# How long past their deadline processes other than 0 wait for process 0's decision, which
# comes at its own deadline at the latest (the deadlines start within one broadcast).
OUTCOME_GRACE_S = 5.0

log = logging.getLogger("ckpt.save")


@dataclasses.dataclass(kw_only=True)
class Job:
    """One save in flight on one process: what the background part needs. Built by
    `start_save` (and by `ckpt._local.start_persist`) by keyword; read by `run` and the
    job's `Copy`."""

    store: DeadlineStore
    coord: _coord.Coordinator
    copy: Copy
    attempt: str
    created_at: float
    metadata: Any
    records: list[LeafRecord]    # this copy's manifest records (checksums filled at commit)
    plans: dict[int, ArrayPlan]  # the chunks of each array leaf this process writes
    snapshot: Snapshot
    timeout_s: float
    deadline: Deadline  # from `timeout_s`; `store` is bound by it
    memory_budget: int
    metrics: dict[str, float]
    digests: tuple[str, dict[str, int]]  # `ckpt._agreement`; empty for one process
    overwrite: bool = False
    # This process's value of each per-process leaf, by leaf position (its host report's).
    per_process: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
    on_commit: Callable[[SaveHandle], None] | None = None
    parents: list[list[Any]] | None = None  # the manifest's ancestry (a tiered manager's)
    prefix: str = ""  # of its coordination keys: the same on every process
    started: float = 0.0   # time.monotonic() when the save was called
    blocked_s: float = 0.0
    blocked: threading.Event = dataclasses.field(default_factory=threading.Event)  # returned
    # Set once a cancel was asked for on this process, or on another (`request_cancel`,
    # `listen_for_cancel`).
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    listener: threading.Thread | None = None  # `listen_for_cancel`'s, in a job of several

    def timings(self, written: float, rows: list[Row], nbytes: int) -> SaveTimings:
        """A committed save's timings, now (``written``: when its writes ended)."""
        done = time.monotonic()
        return SaveTimings(
            blocked_s=self.blocked_s, write_s=written - self.started - self.blocked_s,
            commit_s=done - written, total_s=done - self.started, nbytes=nbytes,
            written_bytes=sum(row[2] for row in rows), leaves=len(self.records),
            snapshot=self.snapshot.mode,
            host_peak_bytes=self.snapshot.feed.peak if self.snapshot.feed is not None else 0)


class Copy:
    """Which copy of a step a save writes and who commits it: the plug point of the one
    save pipeline. This base class is the persistent copy (`ckpt.save_async`, a manager's
    root): each chunk written once, by the process that owns it; every process writes its
    host report; process 0 checks them all and commits. `run` calls the methods below in
    the order they are listed, on every process."""

    def layout(self, records: list[LeafRecord], leaves: list[Any],
               plans: dict[int, ArrayPlan], per_process: list[tuple[int, Any]],
               coord: _coord.Coordinator) -> tuple[list[LeafRecord], dict[int, ArrayPlan]]:
        """Caller's thread, after the ownership plan: the records this copy's manifest
        starts from, and the plans of the chunks this process writes (its snapshot).
        ``leaves`` are the tree's leaves (typed keys as key data), ``per_process`` this
        process's values of per-process leaves by position."""
        return records, plans

    def writes_manifest(self, process: int) -> bool:
        """Whether ``process`` creates each array's ``zarr.json`` and writes a manifest (so
        needs inline leaves encoded)."""
        return process == 0

    def snapshot(self, taken: Snapshot) -> Snapshot:
        """Caller's thread, once the snapshot is taken: what the background part writes
        (the local tier's copy adds its peers' replicas). Here: the snapshot itself."""
        return taken

    def on_caller(self, job: Job) -> None:
        """Caller's thread, after the background part started and before `save_async`
        returns: work that must run there (the local tier's exchange of replicas, which
        runs collectives). Its failures fail the save through its background part."""
        return None

    def written(self, job: Job, rows: list[Row]) -> Any:
        """Background thread, once this process's chunks are durable: what it tells the
        others (a JSON value, `Coordinator.gather`). Here: its host report is written."""
        write_report(job.store, job.attempt, job.coord.process_index, rows, job.digests,
                     job.per_process)
        return None

    def verdict(self, job: Job, outcomes: dict[int, Any]) -> Any:
        """Process 0, once every process reported (none failed): the decision every
        process learns (a JSON value); raising fails the save everywhere. Here: the commit
        (`ckpt._attempt.commit_attempt`)."""
        commit_attempt(job.store, job.attempt, job.records,
                       process_count=job.coord.process_count, metadata=job.metadata,
                       created_at=job.created_at, overwrite=job.overwrite,
                       metrics=job.metrics, parents=job.parents)
        return "ok"

    def unknown(self, job: Job, exc: CoordinationError) -> Any:
        """A process other than 0 that waited in vain for the verdict: the decision it can
        still tell, or an error.

        Process 0's commit can outlast ``timeout_s`` (a slow store); processes must not then
        disagree about whether the save committed. So a process that stops waiting asks
        COMMIT: if it names this attempt, the save committed; if not, it cannot know
        (process 0 may still create it) and says so.
        """
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

    def after(self, job: Job, rows: list[Row], verdict: Any) -> None:
        """Every process, once the verdict is known and was not a failure."""
        return None

    def abandon(self, job: Job, interrupted: bool = False) -> None:
        """This process, after the save failed on it (its own writes have stopped): what
        it must undo before the handle reports the failure. Here process 0 removes the
        attempt under a removal claim (every process has met it after its writes; a writer
        that never arrived is fenced by the claim, and what it still writes is debris),
        within the save's deadline. An attempt claimed for commit is left: its COMMIT may
        still land (`CommitOutcomeUnknownError`). ``interrupted`` (a KeyboardInterrupt on
        the save's thread): nothing more is written or removed."""
        if job.coord.process_index == 0 and not interrupted:
            # Through the save's deadline: past it (a server that stopped answering), the
            # attempt is left to the cleaners rather than waited on.
            remove_uncommitted(job.store, job.attempt)


def _tell(coord: _coord.Coordinator, key: str, value: str) -> None:
    """Publishes ``key`` unless it is there already (another process's cancel, or process
    0's end of the save): the first value stands."""
    try:
        coord.publish(key, value)
    except Exception as exc:  # set already, or the service is gone: nothing to add
        log.debug("%s not published: %s", key, exc)


def request_cancel(job: Job) -> None:
    """Any thread of this process (`SaveHandle.cancel`): asks the save to stop at its next
    chunk boundary on every process. In a job of several processes it publishes
    ``<prefix>/cancel/<p>`` (what process 0 looks up right before it commits) and
    ``<prefix>/stop`` (what every process's `listen_for_cancel` waits for)."""
    if job.cancelled.is_set():
        return  # asked already, here or on another process
    job.cancelled.set()
    if job.coord.process_count > 1:
        _tell(job.coord, f"{job.prefix}/cancel/{job.coord.process_index}", "1")
        _tell(job.coord, f"{job.prefix}/stop", "cancel")


def listen_for_cancel(job: Job) -> None:
    """Every process of a job of several, as its save's background part starts: a daemon
    thread waits, in one blocking read of the coordination service, for ``<prefix>/stop``:
    ``cancel`` (another process's `request_cancel`) sets this process's flag, which its
    chunk loop reads (no request per chunk); ``over`` ends the wait (`stop_listening`).
    Past the save's deadline, or with the service gone, the thread ends quietly: the
    meeting of the processes says what happened."""
    def listen() -> None:
        try:
            said = job.coord.wait_for(f"{job.prefix}/stop",
                                      job.deadline.remaining() + OUTCOME_GRACE_S)
        except Exception:
            return
        if said == "cancel":
            job.cancelled.set()

    job.listener = threading.Thread(target=listen, name=f"ckpt-cancel-{job.attempt}",
                                    daemon=True)
    job.listener.start()


def stop_listening(job: Job) -> None:
    """Every process, once its part of the save is over (before its handle says so): sets
    ``<prefix>/stop`` to ``over`` unless a value is there, and waits for its listener to
    end, so that no thread of the save is left inside the coordination service's client
    when the process exits (one there at interpreter shutdown aborts the process). A
    cancel asked for later than this finds the save over."""
    if job.listener is None:
        return
    _tell(job.coord, f"{job.prefix}/stop", "over")
    job.listener.join(STOP_LISTENING_S)
    if job.listener.is_alive():
        log.warning("the cancel listener of %s did not end within %.0f s (the coordination "
                    "service does not answer)", job.store.url, STOP_LISTENING_S)
    job.listener = None


# How long a save waits for its cancel listener to see the save is over.
STOP_LISTENING_S = 10.0


def check_cancelled(job: Job, *, now: bool = False) -> None:
    """Raises `SaveCancelledError` once a cancel was asked for on any process: this
    process's flag (set by its own request or its listener). ``now`` (process 0, right
    before it commits): the other processes' requests are also looked up in the
    coordination service, so that none asked for before this point is missed."""
    if now and not job.cancelled.is_set() and job.coord.process_count > 1 \
            and job.coord.collect(f"{job.prefix}/cancel/"):
        job.cancelled.set()
    if job.cancelled.is_set():
        raise SaveCancelledError(f"the save of {job.store.url} (attempt {job.attempt}) was "
                                 "cancelled: nothing was committed")


def _host_array(leaf: jax.Array) -> np.ndarray:
    if leaf.sharding.is_fully_replicated:
        return np.array(leaf.addressable_shards[0].data, copy=True)
    return np.array(leaf, copy=True)


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
                    f"leaves {path_text(other.path)} and {path_text(rec.path)} map to the same "
                    f"array name {rec.name!r}")
    return records, leaves


def _agree_on_attempt(store: Store, coord: _coord.Coordinator, seq: int, timeout_s: float, *,
                      overwrite: bool, refuse: Callable[[], CkptError | None] | None,
                      on_attempt: Callable[[str], None] | None) -> str:
    """The attempt id every process of save ``seq`` writes under, drawn by process 0.

    Every reason not to save is decided by process 0 and raised on every process (the same
    error class, naming process 0), so that no process waits for a save process 0 refused.
    """
    def draw() -> str:
        store.verify_access()
        refusal = refuse() if refuse is not None else None
        if refusal is None:
            refusal = refusal_if_committed(store, overwrite=overwrite,
                                           how="pass overwrite=True")
        if refusal is not None:
            raise refusal
        attempt = new_attempt_id()
        if on_attempt is not None:
            on_attempt(attempt)  # before any process can write under it
        return attempt

    return str(coord.decide(f"save/{seq}/attempt", draw, timeout_s))


def _plan_chunks(records: list[LeafRecord], leaves: list[Any],
                 coord: _coord.Coordinator) -> dict[int, ArrayPlan]:
    """Plans every array leaf's chunks and writers (`plan`, the same on every process) and
    attaches each plan's layout to its record, in place."""
    array_ids = [i for i, rec in enumerate(records) if rec.kind == LeafKind.ARRAY]
    inputs = [ArrayInput(records[i].shape, np.dtype(leaves[i].dtype).itemsize,
                         leaves[i].sharding if isinstance(leaves[i], jax.Array) else None)
              for i in array_ids]
    plans = dict(zip(array_ids, plan(inputs, coord.process_index, coord.process_count),
                     strict=True))
    for i, arr, p in zip(array_ids, inputs, plans.values(), strict=True):
        records[i] = dataclasses.replace(records[i], layout=ChunkLayout.planned(
            p.chunk_shape, p.writers, p.chunk_nbytes(arr.itemsize)))
    return plans


def start_save(store: Store, tree: Any, *, metadata: Any = None,
               on_commit: Callable[[SaveHandle], None] | None = None,
               timeout_s: float = _coord.DEFAULT_TIMEOUT_S,
               memory_budget: int = DEFAULT_MEMORY_BUDGET,
               snapshot: str = "auto",
               overwrite: bool = False,
               metrics: dict[str, float] | None = None,
               refuse: Callable[[], CkptError | None] | None = None,
               on_attempt: Callable[[str], None] | None = None,
               step: int | None = None, copy: Copy | None = None,
               parents: list[list[Any]] | None = None,
               compression: str | None = None) -> SaveHandle:
    """Runs the blocking part of a save and starts its background part.

    Called by `ckpt.save_async`, `CheckpointManager.save` and the local tier
    (`ckpt._local.start_local_save`, with its ``copy``), on every process of the job, in
    the same order with trees of the same structure and shardings. ``refuse`` runs on
    process 0 only, before an attempt id is proposed; an error it returns is raised on every
    process. ``on_attempt`` runs on process 0 with the attempt id before it is sent to any
    process, so before anything is written under it. ``on_commit`` runs on every process
    once the save is committed, with its handle; its errors are logged, never raised: the
    checkpoint is committed whatever it does. ``copy`` is the copy of the step it writes
    (default: the persistent copy, `Copy`); ``parents`` the manifest's ancestry
    (docs/format.md); ``compression`` the array chunks' (`ckpt._codecs.canonical`).
    """
    memory_budget = checked_options(snapshot, memory_budget)
    compressed = canonical(compression)
    copy = Copy() if copy is None else copy
    coord = _coord.current()
    created_at = time.time()
    started = time.monotonic()
    deadline = Deadline(timeout_s, f"saving {store.url}")
    store = DeadlineStore(store, deadline)
    with gc_paused():
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
    with gc_paused():
        plans = _plan_chunks(records, leaves, coord)
        if compressed:
            records = [dataclasses.replace(r, compression=compressed)
                       if r.kind == LeafKind.ARRAY else r for r in records]
        agreement = digests(records, leaves) if coord.process_count > 1 else ("", {})
        if copy.writes_manifest(coord.process_index):
            for i, (rec, leaf) in enumerate(zip(records, leaves, strict=True)):
                if rec.kind == LeafKind.INLINE:
                    host = _host_array(leaf) if isinstance(leaf, jax.Array) \
                        else np.asarray(leaf)
                    records[i] = dataclasses.replace(rec, data=encode_inline(host))
        records, plans = copy.layout(records, leaves, plans, per_process, coord)
        taken = copy.snapshot(take(leaves, plans, snapshot, memory_budget))

    handle = SaveHandle(store.url, step)
    handle.attempt = attempt
    job = Job(store=store, coord=coord, copy=copy, attempt=attempt, created_at=created_at,
              metadata=metadata, records=records, plans=plans, snapshot=taken,
              timeout_s=timeout_s, deadline=deadline, memory_budget=memory_budget,
              metrics=dict(metrics or {}), digests=agreement, overwrite=overwrite,
              per_process=per_process, on_commit=on_commit, parents=parents,
              prefix=f"save/{seq}", started=started)
    handle.attach_cancel(functools.partial(request_cancel, job))
    track(handle)
    try:
        threading.Thread(target=run, args=(job, handle), name=f"ckpt-save-{attempt}").start()
        if job.snapshot.mode == "host":
            # The direct path: the caller's shards move to host now, as the budget lets the
            # writes make room (an error doing so fails the save through its handle).
            job.snapshot.fetch()
        copy.on_caller(job)
    finally:
        job.blocked_s = time.monotonic() - job.started
        job.blocked.set()
    log.info("saving %s: %d leaves, %.1f MiB; snapshot %s; blocked %.3f s", handle.describe(),
             len(records), sum(r.nbytes for r in records) / 2**20, taken.mode, job.blocked_s)
    return handle


def start_commit(job: Job, handle: SaveHandle, on_done: Callable[[], None]) -> None:
    """Starts the background part of a save whose snapshot needs no caller (the commit of
    a local step to the persistent root, read back from the local copy): ``job`` has no
    blocking part. ``on_done`` runs on its thread once the save committed or failed. Called
    on every process in the same order; ``job.prefix`` must be the same everywhere."""
    job.started = time.monotonic()
    job.blocked.set()
    handle.attach_cancel(functools.partial(request_cancel, job))
    track(handle)

    def body() -> None:
        try:
            run(job, handle)
        finally:
            on_done()

    threading.Thread(target=body, name=f"ckpt-commit-{job.attempt}").start()


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


def write_snapshot(job: Job, create: bool) -> list[Row]:
    """The background part's writes, on every process: the snapshot's chunks (fetched by a
    thread of their own on the ``device`` path), then the snapshot released; returns the
    host-report rows. A failed write cancels the fetching; whoever fetches (a thread of
    ours, or the caller's on the host path) stops before the snapshot is released."""
    join = start_fetching(job.snapshot, f"ckpt-fetch-{job.attempt}")
    try:
        try:
            rows = _write_chunks(job, create)
        except BaseException as exc:
            job.snapshot.cancel(exc)
            raise
    finally:
        if join is not None:
            join()
        job.blocked.wait()
    job.snapshot.release()
    return rows


def _write_chunks(job: Job, create: bool) -> list[Row]:
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
                check_cancelled(job)  # an Event's flag: nothing is asked of anyone
                owner = unit.feed or feed
                release = (functools.partial(owner.release, unit.nbytes)
                           if owner is not None and i == last else None)
                writer.put(arrays[c.record], c.slices, c.data(host),
                           job.records[c.record].name, c.flat, release)
            del host  # the unit's host copies go once TensorStore holds its own
        return writer.finish()
    except BaseException:
        host = None  # noqa: F841  (the error keeps this frame alive, not its host copies)
        writer.settle()
        raise


def _file_gone(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes says a file was not found: what writing into
    an attempt folder that a cleaner removed fails with (on object stores such writes
    succeed, and the commit claim is what a removal stops)."""
    return any(isinstance(c, FileNotFoundError) or tensorstore_code(c) == "NOT_FOUND"
               for c in causes(exc))


def _real_cause(job: Job, exc: BaseException) -> BaseException:
    """A failed write's real cause when a cleaner removed the attempt under it (another
    writable manager started on the root or folder, `ckpt gc`): the storage error alone
    ("NOT_FOUND: Error writing local file") would not say. Any other error is returned as
    it is."""
    if isinstance(exc, CkptError) and not isinstance(exc, StorageError):
        return exc
    try:
        # Within the save's deadline: past it, the storage error stands as it is.
        removed = claim_kind(job.store, job.attempt) == REMOVING
    except CkptError:
        return exc
    if not removed:
        return exc
    error = AttemptRemovedError(
        f"attempt {job.attempt} of {job.store.url} was removed while it was being written: "
        f"{REMOVED_BY_ANOTHER}")
    error.__cause__ = exc
    return error


def run(job: Job, handle: SaveHandle) -> None:
    """The background part of a save, on its own thread, on every process (module
    docstring). A process whose writes fail still meets the others, having published its
    error, so that the save fails everywhere at once, naming it, instead of waiting for a
    timeout. The handle is finished only once this process has stopped touching storage
    for this save."""
    me = job.coord.process_index
    copy = job.copy
    if job.coord.process_count > 1:
        listen_for_cancel(job)
    # A write failure is classified before this process meets the others: once they have
    # met, process 0 may remove the failed attempt itself, and that must not be read as
    # another writer's removal of it (it would hide this process's own error).
    classified: BaseException | None = None
    try:
        mine: Any
        try:
            rows = write_snapshot(job, create=copy.writes_manifest(me))
            log.debug("%s: chunks written (%d)", handle.describe(), len(rows))
            check_cancelled(job)  # the host report would be written for nothing
            mine = copy.written(job, rows)
            written = time.monotonic()
        except BaseException as exc:
            # Only a symptom of removal (a file gone) is worth a read of the claim here:
            # any other failure (a store that stopped answering) is published at once.
            mine = classified = _real_cause(job, exc) if _file_gone(exc) else exc
        outcomes = job.coord.gather(f"{job.prefix}/written", mine, job.deadline.remaining())
        failed = _coord.errors_of(outcomes)

        def decide() -> Any:
            if failed and all(f.kind == SaveCancelledError.__name__ for f in failed):
                raise SaveCancelledError(
                    f"the save of {job.store.url} (attempt {job.attempt}) was cancelled on "
                    f"process(es) {[f.process for f in failed]}: nothing was committed")
            if failed:
                raise SaveError(f"{job.store.url} was not committed: " + "; ".join(
                    f"process {f.process} failed to write its chunks: {f.kind}: {f.message}"
                    for f in failed))
            # The last moment a cancel wins: a cancel asked for later finds the save
            # committed (`SaveHandle.cancel` returns False then).
            check_cancelled(job, now=True)
            return copy.verdict(job, outcomes)

        if isinstance(mine, BaseException):
            if me == 0:  # the others wait for process 0's decision: it is the failure
                with contextlib.suppress(BaseException):
                    job.coord.decide(f"{job.prefix}/verdict", decide, 0)
            raise mine
        log.debug("%s: every process wrote its chunks", handle.describe())
        verdict = job.coord.decide(
            f"{job.prefix}/verdict", decide, job.deadline.remaining() + OUTCOME_GRACE_S,
            unknown=functools.partial(copy.unknown, job))
        copy.after(job, rows, verdict)
        handle.timings = timings = job.timings(written, rows,
                                               sum(r.nbytes for r in job.records))
        log.info("committed %s: %.1f MiB in %d leaves; blocked %.3f s, write %.3f s, "
                 "commit %.3f s, total %.3f s (%.0f MiB/s)", handle.describe(),
                 timings.nbytes / 2**20, timings.leaves, timings.blocked_s, timings.write_s,
                 timings.commit_s, timings.total_s, timings.mib_per_s)
        if job.on_commit is not None:
            try:
                job.on_commit(handle)
            except Exception:
                log.exception("after committing %s: housekeeping failed (the checkpoint is "
                              "committed; it is retried after the next commit)", job.store.url)
        stop_listening(job)
        handle._finish(None)
    except BaseException as exc:
        error = exc if exc is classified else _real_cause(job, exc)
        if not isinstance(error, CkptError):
            error = SaveError(f"saving {job.store.url} (attempt {job.attempt}, process "
                              f"{me}) failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        try:
            # An interrupt stops at once: what it wrote is debris for the cleaners.
            copy.abandon(job, interrupted=not isinstance(exc, Exception))
        except Exception as cleanup:
            log.warning("removing what the failed save of %s left: %s", job.store.url,
                        cleanup)
        if isinstance(error, SaveCancelledError):
            # Asked for by the job itself, on this process or another: seen, so that no
            # process's next save, wait or exit reports it as a loss.
            handle.mark_observed()
        stop_listening(job)
        handle._finish(error)
    finally:
        stop_listening(job)  # (after an error in the two above: done already otherwise)
        # A failed save's error (kept until someone sees it) holds this frame through its
        # traceback: the snapshot must not stay alive with it.
        job.snapshot.release()


def save_async(url: StoreLike, tree: Any, *, metadata: Any = None,
               timeout_s: float = _coord.DEFAULT_TIMEOUT_S,
               overwrite: bool = False, snapshot: str = "auto",
               memory_budget: int = DEFAULT_MEMORY_BUDGET,
               compression: str | None = None) -> SaveHandle:
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
        compression: None (the default: chunks stored as they are), ``"zstd"`` or
            ``"zstd:<level>"`` (level 3 by default; higher is smaller and slower): each
            array chunk compressed with zstd, a zarr v3 codec TensorStore and zarr-python
            read. Restore needs no option. It pays where bytes cost (object stores billed
            or limited by bytes, states with many zeros); README, "Compression".

    Raises:
        UnsupportedLeafError: a leaf cannot be saved (its key path is named).
        CheckpointExistsError: ``url`` already holds a committed checkpoint (and not
            ``overwrite``).
    """
    return start_save(open_store(url), tree, metadata=metadata, timeout_s=timeout_s,
                      overwrite=overwrite, snapshot=snapshot, memory_budget=memory_budget,
                      compression=compression)


def save(url: StoreLike, tree: Any, *, metadata: Any = None,
         timeout_s: float = _coord.DEFAULT_TIMEOUT_S, overwrite: bool = False,
         snapshot: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
         compression: str | None = None) -> None:
    """Saves ``tree`` to ``url`` and returns once it is committed: `save_async` then `wait`."""
    save_async(url, tree, metadata=metadata, timeout_s=timeout_s, overwrite=overwrite,
               snapshot=snapshot, memory_budget=memory_budget,
               compression=compression).wait()
