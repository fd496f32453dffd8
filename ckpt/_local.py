"""The local tier's copies: each process's own copy of a step, on its host's disk.

Layout (docs/tiers.md): ``<local_dir>/<step>/`` is a checkpoint folder of this library's
format written by one process alone: COMMIT, and an attempt folder whose manifest lists every
leaf of the step with a chunk grid in which each chunk this process's devices hold has writer
= its index and every other chunk writer -1 (not in this copy), and whose ``local`` field
names the process and the step. The attempt id is the save's, the same on every process and
in the persistent root's copy of the step.

A local save is the one save pipeline (`ckpt._save.start_save`) with `LocalTierCopy` as its
copy: every process snapshots and writes every chunk its devices hold
(`ckpt._ownership.held_plan`), not only those it owns; every process publishes its tree
digest (or its failure), process 0 decides (the local steps retention removes once this
one is committed, or why it is not committed), then every process commits its own copy
(`ckpt._attempt.commit_copy`: manifest, commit claim, COMMIT created if absent) and all
learn whether every copy committed. A save that fails removes its own attempt (and the
COMMIT naming it) through `ckpt._housekeeping.delete_checkpoint`, under the same removal
claims as the root's: a copy is never removed without a claim, and a committer that finds
its attempt claimed for removal gives up, so a zombie of an earlier run can never commit a
copy that start-up clean-up emptied.

`ReadBack` is the other direction: the chunks a process owns in the persistent root's plan,
read back from its local copy (each checked against the copy's crc32c) for the commit to the
root (`start_persist`: the same pipeline, the persistent `ckpt._save.Copy`), so that no second
snapshot is held in memory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ckpt import _coord
from ckpt._attempt import Row, commit_copy
from ckpt._claims import delete_data, retire
from ckpt._format import DTYPE_SIZES, ChunkLayout, LeafKind, LeafRecord, pack, unpack
from ckpt._handle import SaveHandle, attempts_in_flight
from ckpt._housekeeping import delete_checkpoint, step_folders
from ckpt._ownership import ArrayInput, ArrayPlan, held_plan
from ckpt._peers import Replicas, WithReplicas, held_for
from ckpt._reader import Readable, open_checkpoint, open_readable
from ckpt._save import Copy, Job, start_commit, start_save
from ckpt._snapshot import ChunkWrite, Snapshot, Unit
from ckpt.errors import CkptError, CoordinationError, InvalidArgumentError, SaveError
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
        raise InvalidArgumentError(
            f"local_dir must be a path on each host's own disk, not {store.url}: the "
            f"persistent root is the place for a bucket")
    return store


@dataclasses.dataclass(frozen=True)
class LocalCopy:
    """One committed local copy, as `scan` found it."""

    step: int
    attempt: str
    process: int        # the index of the process that wrote it
    process_count: int  # of the job that wrote it
    lineage: str = ""   # the root's lineage mark when it was saved
    # The manifest's ancestry ([step, attempt] pairs, `ckpt._format.Manifest.parents`);
    # None for a copy written before ancestry was recorded.
    parents: list[list[Any]] | None = None
    # The processes whose replicas it holds (`local.replicas_of`).
    replicas_of: tuple[int, ...] = ()


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
                                manifest.process_count, manifest.local["lineage"],
                                manifest.parents,
                                tuple(manifest.local.get("replicas_of", ())))
    return found, foreign


def remove_copy(store: Store, step: int) -> list[str]:
    """Deletes the local copy of ``step`` as the root's steps are deleted
    (`ckpt._housekeeping.delete_checkpoint`: COMMIT first, every attempt under a removal
    claim). Returns the attempts it left because a committer claimed them (a paused save
    of this or an earlier run: if it commits, its copy is whole). Idempotent."""
    return delete_checkpoint(store.child(str(step)))


def remove_debris(store: Store, keep: set[int]) -> list[int]:
    """Removes every step folder but ``keep`` (a process's complete copies), and in those
    every attempt their COMMIT does not name (a zombie's late writes, an interrupted save).
    Called at start-up by the process whose folder it is.

    An attempt claimed for commit whose COMMIT never came is removed too, unless a save of
    this process has it in flight (a second manager on the folder): its committer was a
    process of an earlier run (the folder is this process's alone), dead or paused. A
    paused one that resumes finds its claim turned into a removal claim after it creates
    COMMIT, and removes that COMMIT again (`ckpt._commit`); its copy was never offered, since
    copies serve only as the start-up scan found them."""
    removed = []
    live = attempts_in_flight()
    for step in step_folders(store):
        folder = store.child(str(step))
        left = delete_checkpoint(folder) if step not in keep \
            else delete_checkpoint(folder, only=set(_strays(store, step)))
        for attempt in left:
            if attempt not in live:
                retire(folder, attempt)
                delete_data(folder, attempt)
        if step not in keep:
            folder.prune()
            removed.append(step)
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
    parents: list[list[Any]] | None


class LocalTierCopy(Copy):
    """The local tier's copy of a step, as the save pipeline's plug (module docstring).

    ``origin`` is the copy's ``local`` record less the process (root URL, step, lineage
    mark, parents); ``victims`` runs on process 0 when every process has written its
    chunks: the older local steps to remove once this one is committed. After the commit,
    `persist` holds what the root's commit needs and `dropped` those steps."""

    def __init__(self, origin: dict[str, Any], victims: Callable[[], list[int]],
                 on_failure: Callable[[], None] = lambda: None, *,
                 holding: list[list[int]] | None = None, memory_budget: int = 0) -> None:
        self.origin = origin
        self.victims = victims
        self.on_failure = on_failure
        self.dropped: list[int] = []
        self.persist: Persist | None = None
        self._root: tuple[list[LeafRecord], dict[int, ArrayPlan]] = ([], {})
        # `ckpt._peers.holders`: with it, each copy also holds the chunks of the processes
        # it keeps a replica of, received over the exchange (`ckpt._peers.Replicas`).
        self.holding = holding
        self.memory_budget = memory_budget
        self.replicas: Replicas | None = None

    def layout(self, records: list[LeafRecord], leaves: list[Any],
               plans: dict[int, ArrayPlan], per_process: list[tuple[int, Any]],
               coord: _coord.Coordinator) -> tuple[list[LeafRecord], dict[int, ArrayPlan]]:
        self._root = (list(records), plans)
        me, count = coord.process_index, coord.process_count
        inputs = {i: ArrayInput(records[i].shape, np.dtype(leaves[i].dtype).itemsize,
                                getattr(leaves[i], "sharding", None)) for i in plans}
        held = {i: held_plan(inputs[i], p, me, count) for i, p in plans.items()}
        values = dict(per_process)
        writers = {i: list(hp.writers) for i, hp in held.items()}
        if self.holding is not None and count > 1:
            self.replicas = self._replicas(leaves, inputs, plans, held, me, count)
            for q in self.replicas.sources:
                # A replica's chunks name a process whose devices held them (the lowest,
                # when several sources hold one: it arrives, and is written, from each).
                for piece in self.replicas.receives[q]:
                    if writers[piece.record][piece.flat] < 0:
                        writers[piece.record][piece.flat] = q
        out = []
        for i, rec in enumerate(records):
            if i in held:
                hp = held[i]
                rec = dataclasses.replace(rec, layout=ChunkLayout.planned(
                    hp.chunk_shape, writers[i], hp.chunk_nbytes(DTYPE_SIZES[rec.dtype])))
            elif rec.kind == LeafKind.PER_PROCESS:
                mine: list[Any] = [None] * count
                mine[me] = values[i]
                rec = dataclasses.replace(rec, value=mine)
            out.append(rec)
        return out, held

    def _replicas(self, leaves: list[Any], inputs: dict[int, ArrayInput],
                  plans: dict[int, ArrayPlan], held: dict[int, ArrayPlan], me: int,
                  count: int) -> Replicas:
        """What this process sends to the holders of its replica and receives from the
        processes it holds one of: computed from the global shardings alone, the same on
        both ends of every transfer."""
        assert self.holding is not None
        others = set(self.holding[me]) | set(held_for(self.holding, me))
        by_process = {p: {i: held_plan(inputs[i], plans[i], p, count) for i in plans}
                      for p in others}
        by_process[me] = held
        itemsizes = {i: inputs[i].itemsize for i in plans}
        return Replicas(self.holding, me, leaves, by_process, itemsizes, self.memory_budget)

    def snapshot(self, taken: Snapshot) -> Snapshot:
        return taken if self.replicas is None else WithReplicas(taken, self.replicas)

    def on_caller(self, job: Job) -> None:
        if self.replicas is None:
            return
        me = job.coord.process_index

        def publish() -> None:
            # This process's per-process values (a data loader's position) go into the
            # manifests of the copies holding its replica: through the coordination
            # service, small values only.
            if self.replicas is not None and self.replicas.holding[me] and job.per_process:
                job.coord.publish(f"{job.prefix}/per-process/{me}", base64.b64encode(
                    pack([[i, v] for i, v in job.per_process])).decode())

        self.replicas.run(job.coord, job.prefix, job.deadline.remaining(), publish)

    def _with_replicas_values(self, job: Job) -> list[LeafRecord]:
        """The records with the per-process values of the processes this copy holds a
        replica of (published by each at its `on_caller`)."""
        if self.replicas is None or not job.per_process:
            return job.records
        records = list(job.records)
        for q in self.replicas.sources:
            raw = job.coord.wait_for(f"{job.prefix}/per-process/{q}",
                                     job.deadline.remaining())
            for i, value in unpack(base64.b64decode(raw), f"process {q}'s per-process values"):
                mine = list(records[i].value)
                mine[q] = value
                records[i] = dataclasses.replace(records[i], value=mine)
        return records

    def writes_manifest(self, process: int) -> bool:
        return True  # each process's copy is its alone

    def written(self, job: Job, rows: list[Row]) -> Any:
        return tree_digest(job.digests)

    def verdict(self, job: Job, outcomes: dict[int, Any]) -> Any:
        differ = sorted(p for p, digest in outcomes.items() if digest != outcomes[0])
        if differ:
            raise SaveError(f"step {self.origin['step']} not committed to the local tier: "
                            f"processes {differ} saved a tree whose structure or values "
                            "differ from process 0's: every process must save the same tree")
        return self.victims()

    def unknown(self, job: Job, exc: CoordinationError) -> Any:
        raise exc  # no COMMIT of process 0 to ask: each process's copy is its own

    def after(self, job: Job, rows: list[Row], verdict: Any) -> None:
        me = job.coord.process_index
        failure: BaseException | None = None
        local = {"process": me, **self.origin}
        if self.replicas is not None:
            local["replicas_of"] = self.replicas.sources
        try:
            commit_copy(job.store, job.attempt, self._with_replicas_values(job), rows,
                        process_count=job.coord.process_count, metadata=job.metadata,
                        created_at=job.created_at, metrics=job.metrics,
                        local=local, parents=job.parents)
        except BaseException as exc:
            failure = exc
        outcomes = job.coord.gather(f"{job.prefix}/committed", failure,
                                    job.deadline.remaining())
        if failure is not None:
            raise failure
        others = _coord.errors_of(outcomes)
        if others:
            raise SaveError(f"step {self.origin['step']} is not committed to the local tier: "
                            + "; ".join(f"process {f.process} failed to commit its copy: "
                                        f"{f.kind}: {f.message}" for f in others))
        records, plans = self._root
        self.dropped = [int(s) for s in verdict]
        self.persist = Persist(job.attempt, records, plans, job.digests, job.per_process,
                               job.metadata, dict(job.metrics), job.created_at, job.parents)

    def abandon(self, job: Job, interrupted: bool = False) -> None:
        # Not a step of the tier: what this save wrote goes now (its COMMIT first, if it
        # made one), so that neither its bytes nor its COMMIT outlive the failure; a crash
        # or an interrupt leaves them to the next start-up. Whoever waits on the root's
        # commit of the step learns it failed, whatever happens here.
        try:
            if not interrupted:
                delete_checkpoint(job.store.inner, only={job.attempt})
        finally:
            self.on_failure()


def start_local_save(local: Store, tree: Any, *, step: int, origin: dict[str, Any],
                     parents: list[list[Any]], metadata: Any, metrics: dict[str, float],
                     timeout_s: float,
                     snapshot: str, memory_budget: int, compression: str,
                     refuse: Callable[[], CkptError | None],
                     on_attempt: Callable[[str], None],
                     victims: Callable[[], list[int]],
                     on_commit: Callable[[Persist, list[int]], SaveHandle | None],
                     on_failure: Callable[[], None] = lambda: None,
                     holding: list[list[int]] | None = None) -> SaveHandle:
    """Takes the snapshot of every chunk this process holds and starts committing it to
    ``local`` (this process's local tier) as ``step`` in the background.

    Called by `CheckpointManager.save` on every process in the same order. ``refuse`` and
    ``on_attempt`` are `ckpt._save.start_save`'s; ``origin`` goes into each copy's ``local``
    record (`LocalTierCopy`), ``parents`` into its manifest (and the root's, if persisted);
    ``victims`` is `LocalTierCopy`'s. ``on_commit`` runs on every
    process's save thread once every process committed its copy, with what the commit to
    the persistent root needs and the steps retention removes; what it returns (the root
    commit's handle, or None) becomes the handle's ``remote``, and the handle is finished
    after it returns. ``on_failure`` runs on the save's thread when the local save failed
    in the background (after its attempt was removed). ``holding`` (`ckpt._peers.holders`):
    each copy also holds the replicas of the processes it names this process for.
    """
    copy = LocalTierCopy({"step": step, **origin}, victims, on_failure, holding=holding,
                         memory_budget=memory_budget)

    def committed(handle: SaveHandle) -> None:
        assert copy.persist is not None
        handle.remote = on_commit(copy.persist, copy.dropped)

    return start_save(local.child(str(step)), tree, metadata=metadata, on_commit=committed,
                      timeout_s=timeout_s, memory_budget=memory_budget, snapshot=snapshot,
                      overwrite=True, metrics=metrics, refuse=refuse, on_attempt=on_attempt,
                      step=step, copy=copy, parents=parents, compression=compression or None)


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
        for (r, items), host in zip(order.items(), hosts, strict=True):
            for (flat, box), data in zip(items, host, strict=True):
                yield Unit([data], [ChunkWrite(r, flat, to_slices(box))], [None]), [data]

    def release(self) -> None:
        return None


def start_persist(root_step: Store, step: int, persist: Persist, copy: Store, *,
                  timeout_s: float, memory_budget: int,
                  on_commit: Callable[[SaveHandle], None],
                  on_done: Callable[[], None],
                  handle: SaveHandle | None = None) -> SaveHandle:
    """Starts committing locally committed ``step`` to the persistent root, from this
    process's local copy (``copy``), with the save's plan and protocol (the persistent
    `ckpt._save.Copy`: owned chunks, host report, process 0 commits). Called on every
    process by the manager once the local commit is agreed; ``on_commit`` is the save's,
    ``on_done`` runs on the thread when the commit finished or failed; ``handle`` is the
    one to finish (the one `CheckpointManager.save` gave out as ``remote``), else a new one.
    """
    deadline = Deadline(timeout_s, f"saving step {step} to {root_step.url}")
    store = DeadlineStore(root_step, deadline)
    handle = SaveHandle(store.url, step) if handle is None else handle
    handle.attempt = persist.attempt
    owned = {r: p for r, p in persist.plans.items() if p.owned}
    job = Job(store=store, coord=_coord.current(), copy=Copy(), attempt=persist.attempt,
              created_at=persist.created_at, metadata=persist.metadata,
              records=persist.records, plans=persist.plans,
              snapshot=ReadBack(copy, persist.records, owned, memory_budget),
              timeout_s=timeout_s, deadline=deadline, memory_budget=memory_budget,
              metrics=persist.metrics, digests=persist.agreement,
              per_process=persist.per_process, on_commit=on_commit,
              parents=persist.parents, prefix=f"persist/{persist.attempt}")

    def done() -> None:
        failure = handle.outcome()  # finished by now: returns at once
        if failure is not None:
            log.error("step %d was not committed to %s (it stays in the local tier): %s",
                      step, root_step.url, failure)
        on_done()

    start_commit(job, handle, done)
    return handle
