"""The local tier beside a manager's persistent root: what each process's copies are, which
steps every process holds, and reading each box from the nearest copy (docs/tiers.md).

`LocalTier` is held by a `CheckpointManager` made with ``local_dir``, on every process. At
start-up every process scans its own folder (`ckpt._local.scan`), drops copies a root
rewind abandoned, and publishes what it holds through the coordination service; every
process then computes the same set of *complete* steps: those every process of this job
holds a committed copy of, from the same save (attempt id), written by the process of its
own index in a job of the same size. Only a complete step can be restored from the local
tier alone; a copy of a step the root also holds serves whatever boxes it has. The set is
kept the same on every process afterwards: a local commit adds its step on every process
once all committed, and every removal (retention, delete, rewind) is decided on process 0
or from that same set.

`Tiered` is the `Readable` one process restores a step through: its local copy for every
box the copy holds, the persistent root for the rest (opened only if needed).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

from ckpt import _coord
from ckpt._commit import committed_attempt
from ckpt._format import DTYPE_SIZES, LeafKind, LeafRecord
from ckpt._housekeeping import (
    Abandoned,
    LineageEvent,
    abandoned,
    ensure_lineage,
    lineage_id,
    read_lineage,
    survives,
)
from ckpt._local import LocalCopy, local_store, remove_copy, remove_debris, scan
from ckpt._reader import Readable, open_readable
from ckpt.errors import CheckpointExistsError, CheckpointNotFoundError, CkptError
from ckpt.restore import ArrayReadJob
from ckpt.restore.boxes import Box, box_size, chunks_in, flat_index, grid_shape
from ckpt.storage import Store

log = logging.getLogger("ckpt.local")

# Written and deleted at start-up to prove each process can write its folder.
PROBE = "PROBE"

# Every process makes its managers in the same order: the n-th tier's coordination keys
# are the same everywhere.
_TIERS = itertools.count()


class LocalTier:
    """This process's local tier (module docstring). Made by `CheckpointManager.__init__`
    on every process, which must all call it (the start-up exchange is collective)."""

    def __init__(self, local_dir: str, local_keep: int, persist_every: int | None,
                 root: Store, *, read_only: bool, timeout_s: float) -> None:
        if isinstance(local_keep, bool) or not isinstance(local_keep, int) or local_keep < 1:
            raise ValueError(f"local_keep must be an integer >= 1, got {local_keep!r}")
        if persist_every is not None and (isinstance(persist_every, bool) or not isinstance(
                persist_every, int) or persist_every < 1):
            raise ValueError(f"persist_every must be an integer >= 1 or None, got "
                             f"{persist_every!r}")
        coord = _coord.current()
        self.me, self.count = coord.process_index, coord.process_count
        self.keep, self.persist_every, self.read_only = local_keep, persist_every, read_only
        self.store = local_store(local_dir, self.me)
        self.root = root
        # Steps whose commit to the root is under way (process 0 decides retention by them).
        self.pinned: set[int] = set()
        # `complete` and `copies` change on the manager's thread, the local saves' and the
        # root commits' (retention); every read of more than one entry holds this.
        self._lock = threading.RLock()
        key = f"tier/{next(_TIERS)}"
        events, gone = self._root_records(coord, key, timeout_s)
        self.lineage = lineage_id(events)  # what this run's copies record
        self.copies: dict[int, LocalCopy] = {}
        foreign: dict[int, str] = {}
        failure = ""
        try:
            if not read_only:
                # Fail now, not at the first save: a path that is a file, a disk mounted
                # read-only, a folder without permission.
                self.store.write(PROBE, b"")
                self.store.delete(PROBE)
            self.copies, foreign = scan(self.store, root.url)
            for step, copy in list(self.copies.items()):
                # A step a rewind abandoned (still in progress, or done since this copy was
                # saved, by any manager), or deleted since: never offered again.
                if copy.attempt in gone.get(step, ()) or not survives(events, copy.lineage,
                                                                      step):
                    del self.copies[step]
                    if not read_only:
                        remove_copy(self.store, step)
                        log.info("local tier %s: removed step %d (rewound or deleted at %s "
                                 "since it was saved)", self.store.url, step, root.url)
        except CkptError as exc:  # told to every process in the exchange, raised on all
            failure = f"process {self.me}: {exc}"
        # The root's attempt of each step some process holds a copy of but not every
        # process: read once by process 0 and shared, so no other process reads the root.
        self.root_attempts: dict[int, str | None] = {}
        self.complete = self._exchange(coord, key, timeout_s, foreign, failure)
        if not read_only:
            try:
                self._clean()
            except CkptError as exc:  # what is left is removed by a later start-up
                log.warning("local tier %s: start-up clean-up stopped: %s", self.store.url,
                            exc)
        log.info("local tier %s: copies of steps %s; complete on every process: %s",
                 self.store.url, sorted(self.copies), sorted(self.complete))

    def _root_records(self, coord: _coord.Coordinator, key: str,
                      timeout_s: float) -> tuple[list[LineageEvent], Abandoned]:
        """The root's lineage (begun by process 0 if the root has none and the manager may
        write) and the attempts an interrupted rewind abandoned, as process 0 read them:
        the same on every process, and one read of the root, not one per process.

        Raises:
            CkptError: on every process, when process 0 could not read them.
        """
        failure, events, gone = "", [], {}
        if self.me == 0:
            try:
                events = read_lineage(self.root) if self.read_only \
                    else ensure_lineage(self.root)
                gone = abandoned(self.root)
            except CkptError as exc:
                failure = f"process 0 could not read the lineage and rewind records of " \
                    f"{self.root.url}: {exc}"
        if self.count > 1:
            failure, rows, named = json.loads(coord.broadcast(
                f"{key}/lineage", json.dumps([failure, events, {
                    s: sorted(a) for s, a in gone.items()}]) if self.me == 0 else None,
                timeout_s))
            events = [(e[0], e[1], e[2]) for e in rows]
            gone = {int(s): set(a) for s, a in named.items()}
        if failure:
            raise CkptError(failure)
        return events, gone

    def _exchange(self, coord: _coord.Coordinator, key: str, timeout_s: float,
                  foreign: dict[int, str], failure: str) -> dict[int, str]:
        """Every process's copies, through the coordination service: the complete steps
        (step -> attempt), the same on every process; and `root_attempts`.

        Raises:
            CheckpointExistsError: on every process, when any process's folder holds copies
                another root's manager wrote (restoring them would be another run's state;
                removing them could lose it).
            CkptError: on every process, when any process failed to scan its folder.
        """
        mine = [[c.step, c.attempt, c.process, c.process_count] for c in self.copies.values()]
        found: dict[str, list[Any]]
        if self.count == 1:
            found = {"0": [mine, foreign, failure]}
        else:
            coord.publish(f"{key}/copies/{self.me}", json.dumps([mine, foreign, failure]))
            coord.barrier(f"{key}/scanned", timeout_s)
            found = {k.rsplit("/", 1)[-1]: json.loads(v)
                     for k, v in coord.collect(f"{key}/copies/").items()}
        failed = sorted(rows[2] for rows in found.values() if rows[2])
        if failed:
            raise CkptError(f"the local tier {self.store.url} could not be read: "
                            + "; ".join(failed))
        others = {int(p): rows[1] for p, rows in found.items() if rows[1]}
        if others:
            who, steps = min(others.items())
            raise CheckpointExistsError(
                f"the local tier of process {who} holds copies of steps "
                f"{sorted(int(s) for s in steps)} that a manager of another root wrote "
                f"({sorted(set(steps.values()))[0]}), not of {self.root.url}: give each run "
                f"its own local_dir, or remove those copies")
        held: dict[int, dict[int, LocalCopy]] = {}
        for p, (rows, _, _) in found.items():
            for step, attempt, writer, count in rows:
                held.setdefault(step, {})[int(p)] = LocalCopy(step, attempt, writer, count)
        complete = {}
        for step, by_process in held.items():
            attempts = {c.attempt for c in by_process.values()}
            if (len(by_process) == self.count and len(attempts) == 1 and all(
                    c.process == p and c.process_count == self.count
                    for p, c in by_process.items())):
                complete[step] = attempts.pop()
        partial = {}
        if self.me == 0:
            for step in sorted(set(held) - set(complete)):
                try:
                    partial[step] = committed_attempt(self.root.child(str(step)))
                except CkptError:
                    partial[step] = None  # unreadable now: its copies are not trusted
        if self.count > 1:
            shared = coord.broadcast(f"{key}/root", json.dumps(partial) if self.me == 0
                                     else None, timeout_s)
            partial = {int(s): a for s, a in json.loads(shared).items()}
        self.root_attempts = partial
        return complete

    def _clean(self) -> None:
        """Start-up: keeps the newest ``local_keep`` complete steps, and of the others the
        newest ``local_keep`` copies of steps the root holds from the same save (they serve
        the boxes they hold after a change of topology); removes everything else."""
        complete = sorted(self.complete)[-self.keep:]
        partial: list[int] = []
        for step in sorted(set(self.copies) - set(self.complete), reverse=True):
            if len(partial) == self.keep:
                break
            if self.root_attempts.get(step) == self.copies[step].attempt:
                partial.append(step)
        keep = set(complete) | set(partial)
        removed = remove_debris(self.store, keep)
        for step in removed:
            self.copies.pop(step, None)
        self.complete = {s: a for s, a in self.complete.items() if s in keep}
        if removed:
            log.info("local tier %s: removed %s (incomplete, superseded or debris)",
                     self.store.url, removed)

    # -- what the manager asks -------------------------------------------------------------

    def persists(self, step: int) -> bool:
        """Whether a save of ``step`` is also committed to the persistent root."""
        return self.persist_every is None or step % self.persist_every == 0

    def steps(self) -> list[int]:
        """The complete steps, ascending."""
        with self._lock:
            return sorted(self.complete)

    def newest(self) -> int | None:
        with self._lock:
            return max(self.complete, default=None)

    def victims(self, step: int) -> list[int]:
        """Process 0, deciding a local commit of ``step``: the complete steps to remove
        once it is committed everywhere (all but the newest ``local_keep``, never one whose
        commit to the root is under way)."""
        with self._lock:
            steps = sorted(set(self.complete) | {step})
            return [s for s in steps[:-self.keep] if s not in self.pinned]

    def committed(self, step: int, attempt: str, drop: Sequence[int]) -> None:
        """Every process, once every process committed its copy of ``step``."""
        with self._lock:
            self.complete[step] = attempt
            self.copies[step] = LocalCopy(step, attempt, self.me, self.count, self.lineage)
        self.drop(drop, "retention")

    def drop(self, steps: Sequence[int], why: str) -> None:
        """Every process: removes its copies of ``steps`` (retention, delete, rewind). A
        copy that cannot be removed now is left to the next start-up (its step is no longer
        offered; the lineage record keeps a deleted or rewound step from coming back)."""
        for step in steps:
            with self._lock:
                self.complete.pop(step, None)
                held = self.copies.pop(step, None) is not None
            try:
                remove_copy(self.store, step)  # what a failed save left, too
            except CkptError as exc:
                log.warning("local tier %s: could not remove step %d (%s): %s",
                            self.store.url, step, why, exc)
                continue
            if held:
                log.info("local tier %s: removed step %d (%s)", self.store.url, step, why)

    def readable(self, step: int, root: Store, item: str | None) -> Readable:
        """What this process restores ``step`` from: its copy where it holds the step (a
        `Tiered`), else the root's checkpoint.

        Raises:
            CheckpointNotFoundError: no tier holds ``step`` for this process.
        """
        folder = root.child(str(step))
        with self._lock:
            copy, agreed = self.copies.get(step), self.complete.get(step)
        local: Readable | None = None
        if copy is not None:
            try:
                local = open_readable(self.store.child(str(step)), item)
            except CkptError as exc:
                log.warning("local copy of step %d unreadable (%s): reading the root", step,
                            exc)
        if local is not None and copy is not None and copy.attempt == agreed:
            return Tiered(local, folder, None, item)
        if local is not None and copy is not None:
            # Not every process holds the step: this copy serves only if the root's copy is
            # of the same save (its COMMIT, read by process 0 at start-up); the root is
            # read only for boxes the copy lacks. Its records serve too if this process
            # wrote it.
            if self.root_attempts.get(step) == copy.attempt:
                mine = copy.process == self.me and copy.process_count == self.count
                return Tiered(local, folder, None if mine else open_readable(folder, item),
                              item)
        try:
            whole = open_readable(folder, item)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"step {step} is on no tier for process {self.me}: no local copy of it in "
                f"{self.store.url} and no committed copy at {folder.url}") from exc
        if agreed is not None and whole.manifest.attempt != agreed:
            # The other processes read their copies of save ``agreed``: this one must not
            # read another save of the step.
            raise CheckpointNotFoundError(
                f"step {step}: process {self.me}'s local copy is unreadable and {folder.url} "
                f"holds another save of it ({whole.manifest.attempt}, not {agreed})")
        return whole


class Tiered(Readable):
    """One process's view of a step held by its local copy and perhaps the root: each box
    of a leaf the copy holds whole is read from the copy, the rest from the root. The
    leaves' records come from the copy when it was written by this process of a job of
    this size (its per-process values are this process's), else from the root's manifest.
    ``served`` counts the bytes each tier served."""

    kind, checksummed = "ckpt", True

    def __init__(self, local: Readable, root: Store, opened: Readable | None,
                 item: str | None) -> None:
        manifest = local.manifest if opened is None else opened.manifest
        super().__init__(root, manifest, f"{local.layout}, local tier", item)
        self._local, self._opened, self._item = local, opened, item
        self._held = {r.name: r for r in local.manifest.leaves if r.kind == LeafKind.ARRAY}
        self.served = {"local": 0, "root": 0}

    @property
    def attempt(self) -> str:
        """The save the local copy is of."""
        return self._local.manifest.attempt

    def _root(self, rec: LeafRecord) -> Readable:
        if self._opened is None:
            try:
                self._opened = open_readable(self.store, self._item)
            except CheckpointNotFoundError as exc:
                raise CheckpointNotFoundError(
                    f"leaf {rec.path} of step {self.store.url}: the local copy "
                    f"{self._local.store.url} does not hold every box this process needs and "
                    f"the persistent root has no copy of the step") from exc
            if self._opened.manifest.attempt != self._local.manifest.attempt:
                raise CheckpointNotFoundError(
                    f"{self.store.url} holds attempt {self._opened.manifest.attempt}, not "
                    f"{self._local.manifest.attempt} of the local copy: restore again")
        return self._opened

    def read_jobs(self, rec: LeafRecord, boxes: Sequence[Box]) -> list[ArrayReadJob]:
        held = self._held.get(rec.name)
        here = [b for b in boxes if held is not None and _holds(held, b)]
        there = [b for b in boxes if held is None or not _holds(held, b)]
        itemsize = DTYPE_SIZES[rec.dtype]
        jobs = []
        if here:
            assert held is not None
            jobs.append(self._local.read_job(held, here))
            self.served["local"] += sum(box_size(b) for b in here) * itemsize
        if there:
            root = self._root(rec)
            saved = next(r for r in root.manifest.leaves if r.path == rec.path)
            jobs.append(root.read_job(saved, there))
            self.served["root"] += sum(box_size(b) for b in there) * itemsize
        return jobs

    def read_job(self, rec: LeafRecord, boxes: Sequence[Box]) -> ArrayReadJob:
        raise AssertionError("Tiered reads through read_jobs")

    def array_spec(self, rec: LeafRecord) -> dict[str, Any]:
        raise AssertionError("Tiered reads through read_jobs")

    def context(self) -> Any:
        return self._local.context()

    def _chunks_end_with_crc32c(self) -> bool:
        return True


def _holds(rec: LeafRecord, box: Box) -> bool:
    """Whether a local copy's record holds every chunk ``box`` touches."""
    grid = grid_shape(rec.shape, rec.chunk_shape)
    return all(rec.writers[flat_index(c, grid)] >= 0 for c in chunks_in(box, rec.chunk_shape))

