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

import contextlib
import itertools
import logging
import os
import secrets
import threading
from collections.abc import Hashable, Sequence
from typing import Any

from ckpt import _coord, _recovery
from ckpt._commit import committed_attempt
from ckpt._format import DTYPE_SIZES, LeafKind, LeafRecord
from ckpt._housekeeping import (
    Abandoned,
    Lineage,
    abandoned,
    committed_steps,
    ensure_lineage,
    is_committed,
    read_lineage,
    step_names,
    step_store,
)
from ckpt._local import LocalCopy, local_store, remove_copy, remove_debris, scan
from ckpt._peers import held_for, holders
from ckpt._reader import Readable, open_checkpoint, open_readable
from ckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    InvalidArgumentError,
)
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
                 root: Store, *, read_only: bool, timeout_s: float,
                 failure: BaseException | None = None, replicas: int = 0,
                 domains: Sequence[Hashable] | None = None) -> None:
        # Drawn first, on every process, whatever fails below: a manager made again after
        # a failure then meets under the same keys everywhere.
        key = self.key = f"tier/{next(_TIERS)}"
        coord = _coord.current()
        # A failure before this (the root unreachable from one host: ``failure``) reaches
        # every process here, not only the one it happened on.
        coord.gather_all(f"{key}/start", failure, timeout_s, "starting the local tier: ")
        if isinstance(local_keep, bool) or not isinstance(local_keep, int) or local_keep < 1:
            raise InvalidArgumentError(
                f"local_keep must be an integer >= 1, got {local_keep!r}")
        if persist_every is not None and (isinstance(persist_every, bool) or not isinstance(
                persist_every, int) or persist_every < 1):
            raise InvalidArgumentError(f"persist_every must be an integer >= 1 or None, got "
                                       f"{persist_every!r}")
        self.me, self.count = coord.process_index, coord.process_count
        # Who holds a replica of each process's copies (`ckpt._peers.holders`; the same on
        # every process, so each raises the same error for a placement it cannot make).
        self.holding = holders(self.count, replicas, domains) if replicas else None
        self.keep, self.persist_every, self.read_only = local_keep, persist_every, read_only
        self.store = local_store(local_dir, self.me)
        _refuse_inside(self.store, root)
        self.root = root
        # Steps whose commit to the root is under way (process 0 decides retention by them).
        self.pinned: set[int] = set()
        # `complete` and `copies` change on the manager's thread, the local saves' and the
        # root commits' (retention); every read of more than one entry holds this.
        self._lock = threading.RLock()
        self._rooms = itertools.count()  # the n-th save's room check: same keys everywhere
        lineage, gone = self._root_records(coord, key, timeout_s)
        self.lineage = lineage.mark  # what this run's copies record
        self.copies: dict[int, LocalCopy] = {}
        mine: Any
        probe = f"{PROBE}-{self.me}-{secrets.token_hex(4)}"
        try:
            if not read_only:
                # Fail now, not at the first save: a path that is a file, a disk mounted
                # read-only, a folder without permission. The probe stays until every
                # process has looked for the others' (a folder shared by processes).
                self.store.write(probe, b"")
            self.copies, foreign = scan(self.store, root.url)
            for step, copy in list(self.copies.items()):
                # A step a rewind abandoned (still in progress, or done since this copy was
                # saved, by any manager), or deleted since: never offered again.
                if copy.attempt in gone.get(step, ()) or not lineage.survives(copy.lineage,
                                                                              step):
                    del self.copies[step]
                    if not read_only:
                        remove_copy(self.store, step)
                        log.info("local tier %s: removed step %d (rewound or deleted at %s "
                                 "since it was saved)", self.store.url, step, root.url)
            mine = {"copies": self._report(), "foreign": foreign,
                    "placement": self.holding}
        except CkptError as exc:  # told to every process in the exchange, raised on all
            mine = _coord.Failure.of(self.me, exc).error()
            mine.__cause__ = exc
        try:
            found = coord.gather_all(f"{key}/copies", mine, timeout_s,
                                     f"the local tier {self.store.url} could not be read: ")
            self._check(found)
            if not read_only:
                self._check_not_shared(coord, key, timeout_s)
        finally:
            if not read_only:
                with contextlib.suppress(CkptError):
                    self.store.delete(probe)
        if not read_only:
            found = self._recover(coord, key, found, timeout_s)
        # Which copies serve: decided by process 0, which alone reads the root for it.
        decided = coord.decide(f"{key}/trust", lambda: self._trust(found), timeout_s)
        self.complete: dict[int, str] = {int(s): a for s, a in decided["complete"].items()}
        # The root's attempt of each step some process holds a copy of but not every
        # process (its copies serve the boxes they hold only if it is the same save).
        self.root_attempts: dict[int, str | None] = {
            int(s): a for s, a in decided["root"].items()}
        # The saves the newest step descends from (`ckpt._format.Manifest.parents`): what
        # this run's next save records.
        self.ancestry: list[list[Any]] = decided["ancestry"]
        for step in set(self.copies) - set(self.complete):
            if self.root_attempts.get(step) != self.copies[step].attempt:
                log.info("local tier %s: step %d is not offered: its copy is not of a save "
                         "the run at %s holds or descends from", self.store.url, step,
                         root.url)
        if not read_only:
            try:
                self._clean()
            except CkptError as exc:  # what is left is removed by a later start-up
                log.warning("local tier %s: start-up clean-up stopped: %s", self.store.url,
                            exc)
        log.info("local tier %s: copies of steps %s; complete on every process: %s",
                 self.store.url, sorted(self.copies), sorted(self.complete))

    def _report(self) -> list[list[Any]]:
        """This process's copies, as the start-up exchange tells them."""
        return [[c.step, c.attempt, c.process, c.process_count, c.parents,
                 list(c.replicas_of)] for c in self.copies.values()]

    def _recover(self, coord: _coord.Coordinator, key: str, found: dict[int, Any],
                 timeout_s: float) -> dict[int, Any]:
        """Every process, after the exchange of copies: rebuilds the copies some processes
        lack from the replicas others hold (`ckpt._recovery`; process 0 decides which),
        then tells its copies again; returns what every process holds now."""
        decided = coord.decide(f"{key}/recover",
                               lambda: _recovery.plan(found, self.count, self.keep), timeout_s)
        if not decided:
            return found
        for text, chosen in sorted(decided.items(), key=lambda kv: int(kv[0])):
            step = int(text)
            senders = chosen["senders"]
            try:
                _recovery.rebuild(self.store, step, chosen["attempt"],
                                  {int(m): h for m, h in senders.items()},
                                  f"{key}/recover/{step}", timeout_s)
            except CkptError as exc:  # the step is then not complete: never offered
                log.warning("local tier %s: step %d could not be rebuilt from peers: %s",
                            self.store.url, step, exc)
                continue
            if str(self.me) in senders:
                copies, _ = scan(self.store, self.root.url)
                if step in copies:
                    self.copies[step] = copies[step]
        return coord.gather_all(f"{key}/copies-rebuilt", {"copies": self._report()},
                                timeout_s, f"the local tier {self.store.url}: ")

    def _root_records(self, coord: _coord.Coordinator, key: str,
                      timeout_s: float) -> tuple[Lineage, Abandoned]:
        """The root's lineage record (begun by process 0 if the root has none and the
        manager may write) and the attempts an interrupted rewind abandoned, as process 0
        read them: the same on every process, and one read of the root, not one per process.

        Raises:
            CkptError: on every process (the same class), when process 0 could not read them.
        """
        def read() -> Any:
            try:
                lineage = read_lineage(self.root) if self.read_only \
                    else ensure_lineage(self.root)
                gone = abandoned(self.root)
            except CkptError as exc:
                raise type(exc)(f"could not read the lineage and rewind records of "
                                f"{self.root.url}: {exc}") from exc
            return [lineage.to_json(), {s: sorted(a) for s, a in gone.items()}]

        record, named = coord.decide(f"{key}/records", read, timeout_s)
        return (Lineage.from_json(record, f"{self.root.url} LINEAGE"),
                {int(s): set(a) for s, a in named.items()})

    def _check(self, found: dict[int, Any]) -> None:
        """Every process, after the exchange (which raised any process's failure to scan
        its folder on every process): raises the same error everywhere when any process
        holds copies of another root's run, or when processes were given different
        replica placements.

        Raises:
            CheckpointExistsError: some process's folder holds copies another root's
                manager wrote (restoring them would be another run's state; removing them
                could lose it).
            InvalidArgumentError: processes differ in ``local_replicas``/``local_domains``.
        """
        differ = sorted(p for p, v in found.items() if v["placement"] != found[0]["placement"])
        if differ:
            raise InvalidArgumentError(
                f"processes {differ} were given other local_replicas or local_domains than "
                f"process 0 (replicas of each process go to {found[0]['placement']} there): "
                "give every process the same")
        others = {p: v["foreign"] for p, v in found.items() if v["foreign"]}
        if others:
            who, steps = min(others.items())
            raise CheckpointExistsError(
                f"the local tier of process {who} holds copies of steps "
                f"{sorted(int(s) for s in steps)} that a manager of another root wrote "
                f"({sorted(set(steps.values()))[0]}), not of {self.root.url}: give each run "
                f"its own local_dir, or remove those copies")

    def _check_not_shared(self, coord: _coord.Coordinator, key: str,
                          timeout_s: float) -> None:
        """Every process, with its probe written: looks for the other processes' probes in
        its folder. A folder two processes share (``local_dir`` without ``{process}`` on
        one host, or on a shared file system) is refused on every process, naming it.

        Raises:
            CheckpointExistsError: processes share a local folder.
        """
        if self.count == 1:
            return
        seen: Any
        try:
            seen = sorted({int(n.split("-")[1]) for n in self.store.list_children()
                           if n.startswith(f"{PROBE}-") and n.count("-") == 2
                           and n.split("-")[1].isdigit()} - {self.me})
        except CkptError as exc:
            seen = exc
        shared = coord.gather_all(f"{key}/shared", seen, timeout_s,
                                  f"checking the local folder {self.store.url}: ")
        pairs = sorted((p, q) for p, others in shared.items()
                       if not isinstance(others, _coord.Failure) for q in others)
        if pairs:
            p, q = pairs[0]
            raise CheckpointExistsError(
                f"processes {p} and {q} share the local folder {self.store.url}: each "
                f"process needs its own (put {{process}} in local_dir, replaced by each "
                f"process's index)")

    def _trust(self, found: dict[int, Any]) -> dict[str, Any]:
        """Process 0: which copies serve (docs/tiers.md, "Which copies serve").

        A step is *complete* when every process of this job holds a copy of one save,
        written by the process of its index in a job of this size. A complete step serves
        from the local tier alone only if the root holds that same save of the step, or the
        root does not hold the step and the save descends from the root's history: every
        step the root holds from the copy's oldest recorded ancestor up to it is the save
        the copy's ancestry names, and (below the root's newest step) the root's next step
        names the copy among its own ancestors. A step only some processes hold serves
        the boxes a copy holds only if the root holds the same save of it.
        """
        held: dict[int, dict[int, LocalCopy]] = {}
        for p, value in found.items():
            for step, attempt, writer, count, parents, replicas_of in value["copies"]:
                held.setdefault(step, {})[p] = LocalCopy(step, attempt, writer, count, "",
                                                         parents, tuple(replicas_of))
        candidates: dict[int, LocalCopy] = {}
        for step, by_process in held.items():
            attempts = {c.attempt for c in by_process.values()}
            if (len(by_process) == self.count and len(attempts) == 1 and all(
                    c.process == p and c.process_count == self.count
                    for p, c in by_process.items())):
                candidates[step] = by_process[0]
        view = _RootView(self.root)
        complete = {s: c.attempt for s, c in candidates.items() if view.serves(c)}
        partial = {s: view.attempt(s) for s in sorted(set(held) - set(complete))}
        newest_root = view.newest()
        newest = max([*complete, -1])
        if newest > (newest_root if newest_root is not None else -1):
            parents = candidates[newest].parents or []
            ancestry = [*parents, [newest, complete[newest]]]
        elif newest_root is not None:
            ancestry = [[newest_root, view.attempt(newest_root)]] \
                if view.attempt(newest_root) is not None else []
        else:
            ancestry = []
        return {"complete": complete, "root": partial, "ancestry": ancestry}

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

    def room(self, step: int, tree_leaves: list[Any], timeout_s: float) -> bool:
        """Every process, before a local save of ``step``: whether every process's disk has
        room for its copy. Each process tells its free space, the bytes its copy needs
        (every shard its devices hold) and the size of its copies of the steps retention
        removes once this one is committed; process 0 decides. Where that room is short,
        the steps the root also holds among those are removed now (each process's, on
        every process), before the new copy is written; a step held only locally is never
        removed early. False: some process still lacks room, and the step goes to the
        root alone (`CheckpointManager.save` logs it).
        """
        victims = self.victims(step)
        try:
            free = _free_bytes(self.store)
            # With replicas a copy also holds the shards of the processes it keeps a
            # replica of: about as many bytes again for each (evenly sharded states).
            copies = 1 + (len(held_for(self.holding, self.me)) if self.holding else 0)
            mine: Any = {"need": _held_bytes(tree_leaves) * copies, "free": free, "sizes": {
                str(v): sum(self.store.list_sizes(str(v)).values()) for v in victims}}
        except (CkptError, OSError) as exc:
            mine = exc
        key = f"{self.key}/room/{next(self._rooms)}"
        outcomes = _coord.current().gather(key, mine, timeout_s)

        def decide() -> Any:
            failed = _coord.errors_of(outcomes)
            if failed:
                raise failed[0].error("measuring the local tier's free space: ")
            short = {p: v for p, v in outcomes.items()
                     if v["free"] is not None and v["free"] < v["need"]}
            if not short:
                return []
            on_root = set(committed_steps(self.root))
            evict: list[int] = []
            for v in victims:  # oldest first
                if all(v_["free"] + sum(v_["sizes"].get(str(s), 0) for s in evict)
                       >= v_["need"] for v_ in short.values()):
                    break
                if v in on_root:
                    evict.append(v)
            if all(v_["free"] + sum(v_["sizes"].get(str(s), 0) for s in evict) >= v_["need"]
                   for v_ in short.values()):
                return evict
            who = ", ".join(f"process {p}: {v_['free']} bytes free, {v_['need']} needed"
                            for p, v_ in sorted(short.items()))
            log.warning("local tier %s is full (%s): step %d is saved to the persistent "
                        "root alone", self.store.url, who, step)
            return None

        evict = _coord.current().decide(f"{key}/verdict", decide, timeout_s)
        if evict is None:
            return False
        if evict:
            self.drop(evict, f"making room for step {step} (the persistent root holds it)")
        return True

    def committed(self, step: int, attempt: str, parents: list[list[Any]],
                  drop: Sequence[int]) -> None:
        """Every process, once every process committed its copy of ``step`` (saved with
        ``parents``): the next save descends from it."""
        with self._lock:
            self.complete[step] = attempt
            self.copies[step] = LocalCopy(step, attempt, self.me, self.count, self.lineage,
                                          parents)
            self.ancestry = [*self.ancestry, [step, attempt]]
        self.drop(drop, "retention")

    def root_committed(self, step: int, attempt: str) -> None:
        """Every process, once the root committed ``step``: the ancestry later saves record
        starts there (the root's step stands for everything before it)."""
        with self._lock:
            if [step, attempt] in self.ancestry:
                self.ancestry = self.ancestry[self.ancestry.index([step, attempt]):]

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
        folder = step_store(root, step)
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
        # Not every process holds the step: this copy serves only if the root's copy is of
        # the same save (its COMMIT, read by process 0 at start-up); the root is read only
        # for boxes the copy lacks. Its records serve too if this process wrote it.
        if (local is not None and copy is not None
                and self.root_attempts.get(step) == copy.attempt):
            mine = copy.process == self.me and copy.process_count == self.count
            return Tiered(local, folder, None if mine else open_readable(folder, item), item)
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


class _RootView:
    """Process 0's reads of the persistent root while deciding which copies serve: one
    listing of its step folders, then, lazily and once each, whether a folder is a
    committed step, the attempt its COMMIT names and its manifest's ancestry (only for the
    few steps the copies held make it ask about)."""

    def __init__(self, root: Store) -> None:
        self.root = root
        self.names = step_names(root)  # step -> folder, ascending
        self._gone = abandoned(root)
        self._held: dict[int, bool] = {}
        self._attempts: dict[int, str | None] = {}
        self._parents: dict[int, list[list[Any]] | None] = {}

    def holds(self, step: int) -> bool:
        """Whether ``step`` is a committed step of the root."""
        if step not in self._held:
            self._held[step] = step in self.names and is_committed(self.root, step,
                                                                    self._gone, self.names)
        return self._held[step]

    def newest(self) -> int | None:
        return next((s for s in reversed(self.names) if self.holds(s)), None)

    def attempt(self, step: int) -> str | None:
        """The save the root holds of ``step`` (None: none of ours, or unreadable now)."""
        if step not in self._attempts:
            try:
                self._attempts[step] = committed_attempt(
                    step_store(self.root, step, self.names)) if self.holds(step) else None
            except CkptError:
                self._attempts[step] = None  # unreadable now: nothing is trusted against it
        return self._attempts[step]

    def parents(self, step: int) -> list[list[Any]] | None:
        if step not in self._parents:
            try:
                self._parents[step] = open_checkpoint(
                    step_store(self.root, step, self.names))[1].parents
            except CkptError:
                self._parents[step] = None
        return self._parents[step]

    def serves(self, copy: LocalCopy) -> bool:
        """Whether a complete step's copies serve from the local tier (`LocalTier._trust`)."""
        if self.holds(copy.step):
            return self.attempt(copy.step) == copy.attempt
        if copy.parents is None:
            return False  # written before ancestry was recorded: nothing says it descends
        nodes = {int(s): a for s, a in copy.parents}
        nodes[copy.step] = copy.attempt
        # Checked from the oldest ancestor only when the root holds that save: it is then
        # the root step the run went on from. Otherwise (a run begun on an empty root, or
        # whose first ancestor the root no longer holds) every root step below the copy
        # must be one of its ancestors.
        first = copy.parents[0] if copy.parents else None
        low = int(first[0]) if first is not None and self.holds(int(first[0])) \
            and self.attempt(int(first[0])) == first[1] else 0
        for step in self.names:
            if low <= step < copy.step and self.holds(step) \
                    and self.attempt(step) != nodes.get(step):
                return False  # the root committed another save of an ancestor's step
        above = next((s for s in self.names if s > copy.step and self.holds(s)), None)
        if above is not None:
            # A step the root does not hold, below its newest: the run went on from it only
            # if the root's next step descends from it.
            return [copy.step, copy.attempt] in (self.parents(above) or [])
        return True


def _free_bytes(store: Store) -> int | None:
    """Bytes free on the disk of a local folder (None: not a file system, e.g. memory://)."""
    if store.location.scheme != "file":
        return None
    path = store.location.path
    while not os.path.exists(path):
        path = os.path.dirname(path)
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _held_bytes(leaves: list[Any]) -> int:
    """What a process's local copy of ``leaves`` needs on disk, about: every distinct shard
    its devices hold of each array, every host array whole, and a margin for metadata."""
    total = 0
    for leaf in leaves:
        shards = getattr(leaf, "addressable_shards", None)
        if shards is not None:
            seen: set[Any] = set()
            for shard in shards:
                index = tuple((s.start, s.stop) for s in shard.index)
                if index not in seen:
                    seen.add(index)
                    # A leaf without a byte size is too small to matter.
                    with contextlib.suppress(Exception):
                        total += int(shard.data.nbytes)
        else:
            total += int(getattr(leaf, "nbytes", 0))
    return total + total // 50 + (1 << 20)


def _refuse_inside(local: Store, root: Store) -> None:
    """Refuses a local folder that is the persistent root or inside it (its copies would be
    step folders of the root, cleaned and listed as the root's).

    Raises:
        ValueError: naming both folders.
    """
    if local.location.scheme != "file" or root.location.scheme != "file":
        return
    here = os.path.realpath(local.location.path)
    there = os.path.realpath(root.location.path)
    if here == there or here.startswith(there.rstrip(os.sep) + os.sep):
        raise InvalidArgumentError(
            f"local_dir {here} is "
            f"{'the persistent root' if here == there else 'inside the persistent root ' + there}"
            ": give the local tier a folder of its own on each host's disk")


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

