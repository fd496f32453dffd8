"""The local tier's copies: each process's own copy of a step, on its host's disk.

Layout (docs/tiers.md): ``<local_dir>/<step>/`` is a checkpoint folder of this library's
format written by one process alone: COMMIT, and an attempt folder whose manifest lists every
leaf of the step with a chunk grid in which each chunk this process's devices hold has writer
= its index and every other chunk writer -1 (not in this copy), and whose ``local`` field
names the process and the step. The attempt id is the save's, the same on every process and
in the persistent root's copy of the step.

One local save (`start_local_save`, called by `CheckpointManager.save` on every process):

1. Caller's thread: what a save does (classify, attempt id drawn by process 0 with every
   refusal, ownership plan), then the snapshot of every chunk this process holds
   (`ckpt._ownership.held_plan`), not only those it owns.
2. Background thread: write every held chunk into the save's own attempt folder (never
   removing anything there: a zombie of an earlier run could otherwise remove a later
   run's copy; the manager's start-up removes what earlier runs left), meet every process
   (``written``: each publishes its failure or its tree digest; process 0 checks them and
   publishes the verdict), then write the manifest and create the local COMMIT if absent,
   and meet again (``committed``). Only a step every process agreed to commit is ever
   committed anywhere; a save that fails after that removes its own attempt and the COMMIT
   naming it, so a COMMIT in a local folder names a failed save only after a crash, and
   then only on some processes (the step is not complete; start-up removes it).

`ReadBack` is the other direction: the chunks a process owns in the persistent root's plan,
read back from its local copy (each checked against the copy's crc32c) for the background
commit to the root, so that no second snapshot is held in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ckpt import _coord
from ckpt._agreement import digests
from ckpt._commit import commit
from ckpt._format import COMMIT, DTYPE_SIZES, ChunkLayout, LeafKind, LeafRecord
from ckpt._housekeeping import delete_checkpoint, step_folders
from ckpt._leaves import encode_inline
from ckpt._ownership import ArrayInput, ArrayPlan, held_plan
from ckpt._reader import Readable, open_checkpoint, open_readable
from ckpt._save import (
    _LIVE,
    _LIVE_LOCK,
    _SAVE_SEQ,
    OUTCOME_GRACE_S,
    SaveHandle,
    SaveTimings,
    _agree_on_attempt,
    _classify,
    _gc_paused,
    _host_array,
    _Job,
    _plan_chunks,
    _run,
    plain_metadata,
    start_background,
    write_snapshot,
)
from ckpt._snapshot import ChunkWrite, Snapshot, Unit, take
from ckpt.errors import CkptError, SaveError
from ckpt.restore import read_arrays
from ckpt.restore.boxes import box_size, to_slices
from ckpt.storage import Deadline, DeadlineStore, Store, open_store

log = logging.getLogger("ckpt.local")


def local_store(local_dir: str, process: int) -> Store:
    """The local tier's folder of ``process``: ``local_dir`` with ``{process}`` replaced by
    its index. It must be a path on this host (a local disk or a RAM disk).

    Raises:
        ValueError: ``local_dir`` is a URL of another kind of store (s3://, gs://).
    """
    store = open_store(str(local_dir).replace("{process}", str(process)))
    if store.location.scheme not in ("file", "memory"):
        raise ValueError(f"local_dir must be a path on each host's own disk, not "
                         f"{store.url}: the persistent root is the place for a bucket")
    return store


@dataclasses.dataclass(frozen=True)
class LocalCopy:
    """One committed local copy, as `scan` found it."""

    step: int
    attempt: str
    process: int        # the index of the process that wrote it
    process_count: int  # of the job that wrote it
    lineage: str = ""   # the root's newest lineage event when it was saved


def scan(store: Store, root: str) -> tuple[dict[int, LocalCopy], dict[int, str]]:
    """This process's committed local copies of steps of ``root`` (the persistent root's
    URL) by step (COMMIT and a manifest whose sha256 COMMIT records, naming that step), and
    the steps of copies another root's manager wrote (by step: that root). Anything else is
    debris, for `remove_debris`."""
    found, foreign = {}, {}
    for step in step_folders(store):
        try:
            _, manifest = open_checkpoint(store.child(str(step)))
        except CkptError:
            continue
        if manifest.local is None or manifest.local["step"] != step:
            continue
        if manifest.local["root"] != root:
            foreign[step] = manifest.local["root"]
            continue
        found[step] = LocalCopy(step, manifest.attempt, manifest.local["process"],
                                manifest.process_count, manifest.local["lineage"])
    return found, foreign


def remove_copy(store: Store, step: int) -> None:
    """Deletes the local copy of ``step`` (COMMIT first: never half there). Idempotent."""
    store.delete(f"{step}/{COMMIT}")
    store.delete_prefix(str(step))


def remove_debris(store: Store, keep: set[int]) -> list[int]:
    """Removes every step folder but ``keep`` (a process's complete copies), and in those
    every attempt their COMMIT does not name (a zombie's late writes, an interrupted save)."""
    removed = []
    for step in step_folders(store):
        if step not in keep:
            remove_copy(store, step)
            removed.append(step)
        else:
            delete_checkpoint(store.child(str(step)), only=set(_strays(store, step)))
    return removed


def _strays(store: Store, step: int) -> list[str]:
    folder = store.child(str(step))
    try:
        _, manifest = open_checkpoint(folder)
    except CkptError:
        return []
    return [name for name in folder.list_children()
            if name.startswith("attempt-") and name != manifest.attempt]


def tree_digest(agreed: tuple[str, dict[str, int]]) -> str:
    """One string for `ckpt._agreement.digests`: what processes compare at a local commit."""
    tree, values = agreed
    return hashlib.sha256(json.dumps([tree, sorted(values.items())]).encode()).hexdigest()


@dataclasses.dataclass
class Persist:
    """What a locally committed step needs for its commit to the persistent root: the
    save's records and ownership plan (as `ckpt.save_async` would write them) and this
    process's values of per-process leaves."""

    attempt: str
    records: list[LeafRecord]
    plans: dict[int, ArrayPlan]
    agreement: tuple[str, dict[str, int]]
    per_process: list[tuple[int, Any]]
    metadata: Any
    metrics: dict[str, float]
    created_at: float


def start_local_save(local: Store, root: str, lineage: str, tree: Any, *, step: int,
                     metadata: Any,
                     metrics: dict[str, float], timeout_s: float, snapshot: str,
                     memory_budget: int, refuse: Callable[[], CkptError | None],
                     on_attempt: Callable[[str], None],
                     victims: Callable[[], list[int]],
                     on_commit: Callable[[Persist, list[int]], SaveHandle | None]
                     ) -> SaveHandle:
    """Takes the snapshot of every chunk this process holds and starts committing it to
    ``local`` (this process's local tier) as ``step`` in the background.

    Called by `CheckpointManager.save` on every process in the same order. ``refuse`` and
    ``on_attempt`` are `ckpt._save.start_save`'s; ``root`` (the persistent root's URL) and
    ``lineage`` (its newest lineage event, `ckpt._housekeeping.lineage_id`) are recorded in
    the copy. ``victims`` runs on process 0 when every
    process has written its chunks: the older local steps to remove once this one is
    committed (every process removes the same). ``on_commit`` runs on every process's save
    thread once every process committed its copy, with what the commit to the persistent
    root needs and those steps; what it returns (the root commit's handle, or None) becomes
    the handle's ``remote``, and the handle is finished after it returns.
    """
    coord = _coord.current()
    created_at, started = time.time(), time.monotonic()
    deadline = Deadline(timeout_s, f"saving step {step} to {local.url}")
    with _gc_paused():
        records, leaves = _classify(tree, coord.process_count)
    per_process = [(i, rec.value) for i, rec in enumerate(records)
                   if rec.kind == LeafKind.PER_PROCESS]
    metadata = plain_metadata(metadata, f"step {step}")
    seq = next(_SAVE_SEQ)  # shared with ckpt.save_async: one key space for attempt ids
    folder = DeadlineStore(local.child(str(step)), deadline)
    attempt = _agree_on_attempt(folder, coord, seq, timeout_s, overwrite=True,
                                refuse=refuse, on_attempt=on_attempt)
    with _gc_paused():
        plans = _plan_chunks(records, leaves, coord)
        held = {i: held_plan(ArrayInput(records[i].shape, np.dtype(leaves[i].dtype).itemsize,
                                        getattr(leaves[i], "sharding", None)),
                             p, coord.process_index, coord.process_count)
                for i, p in plans.items()}
        taken = take(leaves, held, snapshot, memory_budget)
    agreement = digests(records, leaves) if coord.process_count > 1 else ("", {})
    for i, (rec, leaf) in enumerate(zip(records, leaves)):
        if rec.kind == LeafKind.INLINE:
            host = _host_array(leaf) if isinstance(leaf, jax.Array) else np.asarray(leaf)
            records[i] = dataclasses.replace(rec, data=encode_inline(host))
    persist = Persist(attempt, [dataclasses.replace(r, value=None) if
                                r.kind == LeafKind.PER_PROCESS else r for r in records],
                      plans, agreement, per_process, metadata, dict(metrics), created_at)
    mine = _local_records(records, held, coord.process_index, coord.process_count)
    handle = SaveHandle(folder.url, step)
    handle.attempt = attempt
    job = _Job(folder, coord, seq, attempt, created_at, metadata, mine, held, taken,
               timeout_s, deadline, memory_budget, None, True, dict(metrics), agreement)
    job.started, job.prefix = started, f"local/{attempt}"
    origin = {"root": root, "lineage": lineage}
    start_background(job, handle, lambda: _run_local(job, handle, local, origin, step, persist,
                                                     victims, on_commit),
                     f"ckpt-local-{attempt}")
    log.info("saving step %d to the local tier %s: %d leaves; blocked %.3f s", step,
             local.url, len(records), job.blocked_s)
    return handle


def _local_records(records: list[LeafRecord], held: dict[int, ArrayPlan], me: int,
                   count: int) -> list[LeafRecord]:
    """The records of this process's copy: held layouts (checksums filled in at commit),
    and each per-process leaf with this process's value only."""
    out = []
    for i, rec in enumerate(records):
        if i in held:
            hp = held[i]
            rec = dataclasses.replace(rec, layout=ChunkLayout.planned(
                hp.chunk_shape, hp.writers, hp.chunk_nbytes(DTYPE_SIZES[rec.dtype])))
        elif rec.kind == LeafKind.PER_PROCESS:
            values: list[Any] = [None] * count
            values[me] = rec.value
            rec = dataclasses.replace(rec, value=values)
        out.append(rec)
    return out


def _verdict(job: _Job, me: int, mine: str, victims: Callable[[], list[int]]) -> list[int]:
    """Every process: after ``written``, process 0 compares every process's outcome
    (a failure, or its tree digest) and publishes the verdict: the local steps to remove
    once this one is committed, or why it is not; the others wait for it.

    Raises:
        SaveError: some process failed, or saved a different tree.
    """
    drop: list[int] = []
    if me == 0:
        found = job.coord.collect(f"{job.prefix}/state/")
        bad = sorted((int(k.rsplit("/", 1)[-1]), v[len("failed:"):])
                     for k, v in found.items() if v.startswith("failed:"))
        differ = sorted(int(k.rsplit("/", 1)[-1]) for k, v in found.items()
                        if not v.startswith("failed:") and v != mine)
        verdict = "ok"
        if not bad and not differ:
            drop = victims()
        if bad:
            verdict = "; ".join(f"process {p} failed to write its local copy: {why}"
                                for p, why in bad)
        elif differ:
            verdict = (f"processes {differ} saved a tree whose structure or values differ "
                       "from process 0's: every process must save the same tree")
        job.coord.publish(f"{job.prefix}/verdict", json.dumps([verdict, drop]))
    else:
        verdict, drop = json.loads(job.coord.wait_for(
            f"{job.prefix}/verdict", job.deadline.remaining() + OUTCOME_GRACE_S))
    if verdict != "ok":
        raise SaveError(f"step not committed to the local tier: {verdict}")
    return [int(s) for s in drop]


def _run_local(job: _Job, handle: SaveHandle, local: Store, origin: dict[str, str],
               step: int, persist: Persist,
               victims: Callable[[], list[int]],
               on_commit: Callable[[Persist, list[int]], SaveHandle | None]) -> None:
    """The background part of a local save, on every process (module docstring)."""
    me = job.coord.process_index
    try:
        try:
            rows = write_snapshot(job, create=True)
        except BaseException as exc:
            job.coord.publish(f"{job.prefix}/state/{me}", f"failed:{type(exc).__name__}: {exc}")
            if me == 0:  # the others would wait for a verdict until their deadline
                job.coord.publish(f"{job.prefix}/verdict", json.dumps(
                    [f"process 0 failed to write its local copy: {type(exc).__name__}: {exc}",
                     []]))
            with _suppress_coordination():
                job.coord.barrier(f"{job.prefix}/written", job.deadline.remaining())
            raise
        mine = tree_digest(job.digests)
        job.coord.publish(f"{job.prefix}/state/{me}", mine)
        job.coord.barrier(f"{job.prefix}/written", job.deadline.remaining())
        written = time.monotonic()
        drop = _verdict(job, me, mine, victims)
        crcs = {(name, flat): crc for name, flat, _, crc in rows}
        records = [dataclasses.replace(rec, layout=rec.layout.with_crc32c(
            [crcs.get((rec.name, f), 0) for f in range(len(rec.writers))]))
            if rec.kind == LeafKind.ARRAY else rec for rec in job.records]
        failure = ""
        try:
            commit(job.store, attempt=job.attempt, records=records,
                   process_count=job.coord.process_count, metadata=job.metadata,
                   created_at=job.created_at, metrics=job.metrics,
                   local={"process": me, "step": step, **origin})
        except BaseException as exc:
            failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            job.coord.publish(f"{job.prefix}/commit-state/{me}", failure or "ok")
            with _suppress_coordination(bool(failure)):
                job.coord.barrier(f"{job.prefix}/committed", job.deadline.remaining())
        others = {k.rsplit("/", 1)[-1]: v for k, v in
                  job.coord.collect(f"{job.prefix}/commit-state/").items() if v != "ok"}
        if others:
            raise SaveError(f"step {step} is not committed to the local tier: " + "; ".join(
                f"process {p} failed to commit its copy: {v}" for p, v in sorted(others.items())))
        handle.timings = SaveTimings.of(job, written, rows,
                                        sum(r.nbytes for r in persist.records))
        log.info("committed step %d to the local tier %s: wrote %.1f MiB; blocked %.3f s, "
                 "total %.3f s", step, job.store.url, handle.timings.written_bytes / 2**20,
                 job.blocked_s, handle.timings.total_s)
        try:
            handle.remote = on_commit(persist, drop)
        except Exception:
            # The step is committed on every process whatever this does (retention, the
            # root commit's start): logged, and retried by the next save's retention.
            log.exception("after committing step %d to the local tier %s: housekeeping "
                          "failed", step, job.store.url)
        handle._finish(None)
    except BaseException as exc:
        # Not a step of the tier: what this save wrote goes now (its COMMIT first, if it
        # made one), so that neither its bytes nor its COMMIT outlive the failure; a crash
        # leaves them to the next start-up.
        try:
            delete_checkpoint(local.child(str(step)), only={job.attempt})
        except Exception as cleanup:
            log.warning("removing what failed step %d left in %s: %s", step, local.url,
                        cleanup)
        if isinstance(exc, CkptError):
            handle._finish(exc)
        else:
            error = SaveError(f"saving step {step} to {job.store.url} (attempt "
                              f"{job.attempt}, process {me}) failed: {type(exc).__name__}: "
                              f"{exc}")
            error.__cause__ = exc
            handle._finish(error)
    finally:
        job.snapshot.release()


class _suppress_coordination:
    """Suppresses a `CoordinationError` (when ``active``): a process that failed still
    meets the others, and its own error is the one to report."""

    def __init__(self, active: bool = True) -> None:
        self.active = active

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self.active and exc_type is not None and issubclass(exc_type, CkptError)


# -- reading a copy back for the persistent root --------------------------------------------

class ReadBack(Snapshot):
    """The chunks this process owns in the persistent root's plan, read from its local
    copy in batches of at most half ``budget`` bytes (each chunk checked against the copy's
    crc32c): the snapshot a commit to the root writes (`ckpt._save._run`)."""

    def __init__(self, copy: Store, records: list[LeafRecord],
                 plans: dict[int, ArrayPlan], budget: int) -> None:
        super().__init__("local", [])
        self._store, self._records, self._plans = copy, records, plans
        self._copy: Readable | None = None
        self._budget = max(1, budget // 2)

    def items(self, deadline: Deadline,
              idle: Callable[[], bool]) -> Iterator[tuple[Unit, list[np.ndarray]]]:
        self._copy = open_readable(self._store)  # here: its errors fail the save
        by_name = {r.name: r for r in self._copy.manifest.leaves if r.kind == LeafKind.ARRAY}
        work = [(r, flat, p.chunk_box(flat)) for r, p in self._plans.items()
                for flat in sorted(p.owned)]
        batch: list[tuple[int, int, Any]] = []
        size = 0
        for i, item in enumerate(work):
            batch.append(item)
            size += box_size(item[2]) * DTYPE_SIZES[self._records[item[0]].dtype]
            if size >= self._budget or i == len(work) - 1:
                yield from self._read(batch, by_name, deadline)
                batch, size = [], 0

    def _read(self, batch: list[tuple[int, int, Any]], by_name: dict[str, LeafRecord],
              deadline: Deadline) -> Iterator[tuple[Unit, list[np.ndarray]]]:
        order: dict[int, list[tuple[int, Any]]] = {}
        for r, flat, box in batch:
            order.setdefault(r, []).append((flat, box))
        assert self._copy is not None
        jobs = [self._copy.read_job(by_name[self._records[r].name], [b for _, b in items])
                for r, items in order.items()]
        hosts = read_arrays(jobs, deadline=deadline)
        for (r, items), host in zip(order.items(), hosts):
            for (flat, box), data in zip(items, host):
                yield Unit([data], [ChunkWrite(r, flat, to_slices(box))], [None]), [data]

    def release(self) -> None:
        return None


def start_persist(root_step: Store, step: int, persist: Persist, copy: Store, *,
                  timeout_s: float, memory_budget: int, on_commit: Callable[[], None],
                  on_done: Callable[[], None]) -> SaveHandle:
    """Starts committing locally committed ``step`` to the persistent root, from this
    process's local copy (``copy``), with the save's plan and protocol (`ckpt._save._run`:
    owned chunks, host report, process 0 commits). Called on every process by the manager
    once the local commit is agreed; ``on_commit`` is the save's, ``on_done`` runs on the
    thread when the commit finished or failed."""
    coord = _coord.current()
    deadline = Deadline(timeout_s, f"saving step {step} to {root_step.url}")
    store = DeadlineStore(root_step, deadline)
    handle = SaveHandle(store.url, step)
    handle.attempt = persist.attempt
    with _LIVE_LOCK:
        _LIVE.add(handle)
    owned = {r: p for r, p in persist.plans.items() if p.owned}
    job = _Job(store, coord, -1, persist.attempt, persist.created_at, persist.metadata,
               persist.records, persist.plans, ReadBack(copy, persist.records, owned,
                                                        memory_budget),
               timeout_s, deadline, memory_budget, on_commit, False, persist.metrics,
               persist.agreement, persist.per_process)
    job.started, job.prefix = time.monotonic(), f"persist/{persist.attempt}"
    job.blocked.set()

    def run() -> None:
        try:
            _run(job, handle)
            if handle._exc is not None:
                log.error("step %d was not committed to %s (it stays in the local tier): %s",
                          step, root_step.url, handle._exc)
        finally:
            on_done()

    threading.Thread(target=run, name=f"ckpt-persist-{persist.attempt}").start()
    return handle
