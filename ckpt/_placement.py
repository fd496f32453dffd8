"""Where a manager's steps live: the root alone, or a local tier beside it.

A `CheckpointManager` holds one placement, chosen by ``local_dir``, and asks it everything
that depends on where steps are: the step list and the newest step, saving, removing
(delete, rewind, retention after a root commit) and what a restore reads (with its
fallback). The manager keeps what is the same either way: its options, the save policy,
metrics and ranking, refusals, debris removal and its lifetime.

- `RootOnly`: every step is a checkpoint at ``<root>/<step>/``.
- `WithLocalTier`: every step is committed to each host's local folder first
  (`ckpt._tiers.LocalTier`, `ckpt._local`), chosen steps to the root afterwards, and a
  restore reads each box from the nearest copy (docs/tiers.md).

Every method is called on every process, in the same order, by the manager's thread,
except where its docstring says otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax

from ckpt import _coord
from ckpt._commit import committed_attempt
from ckpt._handle import SaveHandle
from ckpt._housekeeping import (
    committed_steps,
    is_committed_step,
    latest_committed_step,
    read_lineage,
    remove_steps,
    rewind_root,
    step_folders,
    step_store,
    steps_near,
)
from ckpt._local import Persist, start_local_save, start_persist
from ckpt._reader import open_readable
from ckpt._restore import restore_from
from ckpt._save import start_save
from ckpt._tiers import LocalTier, Tiered
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    SaveError,
)
from ckpt.storage import Deadline, Store

log = logging.getLogger("ckpt.manager")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """What a placement needs of its manager (all set once, by `CheckpointManager`)."""

    root: Store
    timeout_s: float
    snapshot: str
    memory_budget: int
    compression: str  # canonical (`ckpt._codecs`)
    # Process 0, before a save of a step: the error that stops it, if any.
    refuse: Callable[[int], CkptError | None]
    # Process 0, after a root commit: the root's steps retention removes.
    victims: Callable[[], list[int]]
    # Every process, once a step is committed to the root: its metrics.
    saved: Callable[[int, dict[str, float] | None], None]
    # Every process, once a save's attempts (these ids) are no longer in flight.
    finished: Callable[[list[str]], None]
    # Every process, once steps left the run: forget what was kept of them.
    removed: Callable[[list[int]], None]


class RootOnly:
    """Every step a checkpoint at ``<root>/<step>/`` (a manager without ``local_dir``)."""

    def __init__(self, setting: Setting) -> None:
        self.s = setting
        self.root = setting.root

    def steps(self, above: int | None = None) -> list[int]:
        """The committed steps (above ``above``, if given), ascending."""
        return committed_steps(self.root, above)

    def holds(self, step: int) -> bool:
        """Whether ``step`` is a committed step now (a few requests, whatever the number of
        steps: `CheckpointManager.watch`, before it yields a step it listed earlier)."""
        return is_committed_step(self.root, step)

    def newest(self, store: Store) -> int | None:
        """The newest committed step, through ``store`` (the root, or it bound by a
        restore's deadline)."""
        return latest_committed_step(store)

    def folder(self, step: int, names: dict[int, str] | None = None) -> Store:
        """Where committed ``step``'s manifest is (for its metrics); ``names``: the root's
        step folders (`step_names`), listed here if not given."""
        return step_store(self.root, step, names)

    def save(self, step: int, tree: Any, metadata: Any, metrics: dict[str, float] | None,
             draw: Callable[[str], None], drawn: list[str]) -> SaveHandle:
        """Starts saving ``step`` (`ckpt._save.start_save`); ``draw`` is its
        ``on_attempt``, ``drawn`` the attempt ids it drew."""
        return start_save(self.root.child(str(step)), tree, metadata=metadata,
                          on_commit=lambda _: self.committed(step, metrics, drawn),
                          timeout_s=self.s.timeout_s, metrics=metrics,
                          refuse=lambda: self.s.refuse(step), on_attempt=draw, step=step,
                          snapshot=self.s.snapshot, memory_budget=self.s.memory_budget,
                          compression=self.s.compression or None)

    def committed(self, step: int, metrics: dict[str, float] | None, drawn: list[str],
                  attempt: str | None = None) -> None:
        """Every process, on the save's thread, once ``step`` committed to the root: the
        manager ranks it; process 0 applies retention (`remove_steps`, which records the
        removals first)."""
        self.s.finished(drawn)
        self.s.saved(step, metrics)
        if _coord.current().process_index == 0:
            self._remove(self.s.victims())

    def _remove(self, victims: list[int], then: Callable[[str], None] | None = None) -> None:
        """Process 0: retention's removal of ``victims`` from the root (``then`` runs
        between the record and the deletes). A failure is logged by the save's thread and
        the same victims are found again after the next commit."""
        kept = remove_steps(self.root, victims, then=then)
        self.s.removed(victims)
        for step in victims:
            log.info("retention: deleted step %d under %s%s", step, self.root.url,
                     f" (left {kept[step]}: claimed for commit)" if step in kept else "")

    def settle(self) -> None:
        """Waits for work a save left running beyond its own handle (nothing here)."""
        return None

    def pending(self) -> list[SaveHandle]:
        """Handles beyond the manager's last save that `wait` and `close` wait for."""
        return []

    def raised_by_next_save(self, handle: SaveHandle) -> bool:
        """Whether the next `save`, `delete` or `rewind` raises ``handle``'s unseen error
        (the manager's last save); False for a commit to the root that processes may see
        end differently, which only `wait`, `close` and the handle itself raise."""
        return True

    def delete(self, step: int) -> None:
        """Deletes committed ``step`` (`remove_steps`, on process 0)."""
        def run() -> str:
            if step not in self.steps():
                raise CheckpointNotFoundError(self._not_found(step))
            marks: list[str] = []
            kept = remove_steps(self.root, [step], then=marks.append)
            if kept:
                log.warning("deleted step %d under %s, but left %s: claimed for commit by a "
                            "job that may still be running (if it commits, the step comes "
                            "back whole)", step, self.root.url, kept[step])
            return marks[0]

        self._deleted(step, _coord.run_on_process_zero(f"delete step {step}", run,
                                                       self.s.timeout_s))

    def _not_found(self, step: int) -> str:
        return f"step {step} is not a committed step under {self.root.url}"

    def _deleted(self, step: int, mark: str) -> None:
        self.s.removed([step])

    def rewind(self, step: int) -> None:
        """Makes ``step`` the newest (`rewind_root`, on process 0)."""
        _coord.run_on_process_zero(f"rewind to step {step}", lambda: self._rewind_root(step),
                                   self.s.timeout_s)

    def _rewind_root(self, step: int) -> None:
        steps = self.steps()
        if step not in steps:
            raise CheckpointNotFoundError(
                f"cannot rewind to step {step}: it is not a committed step under "
                f"{self.root.url} ({steps_near(steps, step)})")
        # Uncommitted step folders above ``step`` go too: their debris would otherwise sit
        # on the abandoned branch.
        above = [s for s in step_folders(self.root) if s > step]
        rewind_root(self.root, step, above)
        log.info("rewound %s to step %d; removed steps %s", self.root.url, step, above)

    def restore(self, step: int, store: Store, target: Any, mesh: Any, item: str | None,
                deadline: Deadline | None, memory_budget: int | None = None) -> Any:
        """Restores committed ``step`` through ``store`` (the root, maybe deadline-bound)."""
        return restore_from(step_store(store, step), target, mesh=mesh, item=item,
                            deadline=deadline, memory_budget=memory_budget)


class WithLocalTier(RootOnly):
    """Every step committed to each host's local folder first, chosen steps to the root
    in the background (docs/tiers.md)."""

    def __init__(self, setting: Setting, tier: LocalTier) -> None:
        super().__init__(setting)
        self.tier = tier
        self._persist: SaveHandle | None = None  # the commit to the root under way
        self._roots: list[SaveHandle] = []  # root commits not yet known to have succeeded

    def steps(self, above: int | None = None) -> list[int]:
        """The root's committed steps and the steps whose local copies serve (above
        ``above``, if given), ascending."""
        local = [s for s in self.tier.steps() if above is None or s > above]
        return sorted(set(committed_steps(self.root, above)) | set(local))

    def holds(self, step: int) -> bool:
        return step in self.tier.steps() or super().holds(step)

    def newest(self, store: Store) -> int | None:
        """The newest step restorable from the tiers: the root's newest, or a newer step
        whose local copies serve."""
        newest = latest_committed_step(store)
        local = self.tier.newest()
        if local is not None:
            newest = local if newest is None else max(newest, local)
        return newest

    def folder(self, step: int, names: dict[int, str] | None = None) -> Store:
        folder = step_store(self.root, step, names)
        if step in self.tier.complete and not folder.exists("COMMIT"):
            return self.tier.store.child(str(step))  # a step of the local tier alone
        return folder

    def settle(self) -> None:
        """Waits for the root commit under way, without raising its error: processes can
        see its outcome differently (one may not learn whether process 0 committed), and
        what follows (a save, a delete) must start on all of them. Its failure is logged,
        and raised by `handle.remote.wait()`, `wait` and `close`."""
        if self._persist is not None:
            self._persist.outcome()

    def pending(self) -> list[SaveHandle]:
        """Every root commit whose failure nobody has seen yet, oldest first, then the one
        under way: `wait` and `close` raise each failure once."""
        self._roots = [h for h in self._roots if not h.done() or (
            h.outcome() is not None and not h.observed_by_user)]
        return list(self._roots)

    def raised_by_next_save(self, handle: SaveHandle) -> bool:
        return handle not in self._roots

    def _root_commit(self, handle: SaveHandle) -> None:
        """Every process: ``handle`` is the commit to the root now under way."""
        self._persist = handle
        self._roots.append(handle)

    def save(self, step: int, tree: Any, metadata: Any, metrics: dict[str, float] | None,
             draw: Callable[[str], None], drawn: list[str],
             persist: bool = False) -> SaveHandle:
        """The local commit now; the root's, if this step is persisted (``persist``, or
        `LocalTier.persists`), started by it in the background (one at a time: a persisted
        step first waits for the previous one's). A step the local disks have no room for
        goes to the root alone."""
        tier = self.tier
        persist = persist or tier.persists(step)
        if persist:
            self.settle()
        parents = [list(p) for p in tier.ancestry]
        if not tier.room(step, jax.tree_util.tree_leaves(tree), self.s.timeout_s):
            # A full local disk never stops persistence: this step goes to the root alone,
            # as a root commit like any other (one at a time, its error raised by `wait`,
            # `close` and its handle, never by the next save).
            self.settle()

            def root_only(handle: SaveHandle) -> None:
                tier.ancestry = [*parents, [step, handle.attempt]]
                self.committed(step, metrics, drawn, handle.attempt)

            handle = start_save(self.root.child(str(step)), tree, metadata=metadata,
                                on_commit=root_only, timeout_s=self.s.timeout_s,
                                metrics=metrics, refuse=lambda: self.s.refuse(step),
                                on_attempt=draw, step=step, snapshot=self.s.snapshot,
                                memory_budget=self.s.memory_budget, parents=parents,
                                compression=self.s.compression or None)
            self._root_commit(handle)
            return handle

        # The root's commit of a persisted step has its handle from the start: `save`
        # returns it as ``remote`` (None only for a step kept locally alone).
        remote = SaveHandle(self.root.child(str(step)).url, step) if persist else None

        def locally(saved: Persist, drop: list[int]) -> SaveHandle | None:
            # Every process, on the local save's thread, once every copy is committed.
            started = False
            try:
                tier.committed(step, saved.attempt, parents, drop)
                if remote is None:
                    self.s.finished(drawn)
                    return None
                tier.pinned.add(step)
                start_persist(
                    self.root.child(str(step)), step, saved, tier.store.child(str(step)),
                    timeout_s=self.s.timeout_s, memory_budget=self.s.memory_budget,
                    on_commit=lambda _: self.committed(step, metrics, drawn, saved.attempt),
                    on_done=lambda: self._persist_done(step, drawn), handle=remote)
                started = True
                return remote
            finally:
                if remote is not None and not started:  # reported, never left waiting
                    self._persist_done(step, drawn)
                    remote._finish(SaveError(f"the commit of step {step} to "
                                             f"{self.root.url} did not start"))

        def failed() -> None:
            self.s.finished(drawn)
            if remote is not None:
                remote._finish(SaveError(f"step {step} was not committed to {self.root.url}: "
                                         "its local commit failed (the save's own error "
                                         "says why)"))
                remote.mark_observed()  # the local save's error reports it, once

        handle = start_local_save(
            tier.store, tree, step=step, origin={"root": self.root.url, "lineage": tier.lineage},
            parents=parents, metadata=metadata, metrics=dict(metrics or {}),
            timeout_s=self.s.timeout_s, snapshot=self.s.snapshot,
            memory_budget=self.s.memory_budget, compression=self.s.compression,
            refuse=lambda: self.s.refuse(step), on_attempt=draw,
            victims=lambda: tier.victims(step), on_commit=locally, on_failure=failed,
            holding=tier.holding)
        handle.remote = remote
        if remote is not None:
            self._root_commit(remote)
        return handle

    def _persist_done(self, step: int, drawn: list[str]) -> None:
        self.tier.pinned.discard(step)
        self.s.finished(drawn)

    def committed(self, step: int, metrics: dict[str, float] | None, drawn: list[str],
                  attempt: str | None = None) -> None:
        """Every process, once ``step`` (the save ``attempt``) committed to the root: later
        saves descend from it; the manager ranks it; process 0 decides retention and
        `remove_steps` records it, then every process removes its local copies of the steps
        it removes (process 0 before it deletes the root's). A copy some process cannot
        remove never comes back: the record says its step was removed. A failure of
        retention reaches every process (logged by the save's thread: the step is committed
        whatever it does) and the same steps are found again after the next commit."""
        assert attempt is not None
        tier = self.tier
        self.s.finished(drawn)
        self.s.saved(step, metrics)
        tier.root_committed(step, attempt)

        def retain() -> list[Any]:  # process 0
            victims = self.s.victims()
            marks = [tier.lineage]

            def then(mark: str) -> None:
                marks.append(mark)
                tier.drop(victims, "retention removes it from the persistent root")

            if victims:
                self._remove(victims, then=then)
            return [victims, marks[-1]]

        removed, tier.lineage = _coord.current().decide(
            f"persist/{attempt}/retention", retain, self.s.timeout_s)
        if _coord.current().process_index != 0:
            tier.drop(removed, "retention removes it from the persistent root")
            self.s.removed(removed)

    def _not_found(self, step: int) -> str:
        return super()._not_found(step) + " or in its local tier"

    def _deleted(self, step: int, mark: str) -> None:
        # Recorded before the root's copy went: a copy some process cannot remove now is
        # never offered again.
        self.tier.lineage = mark
        self.tier.drop([step], "deleted")
        super()._deleted(step, mark)

    def rewind(self, step: int) -> None:
        """Decided on process 0 (``step`` on a tier; the ancestry the run goes on from);
        every process drops its copies above it, then process 0 rewinds the root."""
        tier = self.tier

        def check() -> list[list[Any]]:
            steps = self.steps()
            if step not in steps:
                raise CheckpointNotFoundError(
                    f"cannot rewind to step {step}: it is not a committed step under "
                    f"{self.root.url} or in the local tier ({steps_near(steps, step)})")
            if step in committed_steps(self.root):
                attempt = committed_attempt(step_store(self.root, step))
                return [[step, attempt]] if attempt is not None else []
            copy = tier.copies[step]
            return [*(copy.parents or []), [step, copy.attempt]]

        try:
            ancestry = _coord.run_on_process_zero(f"check rewind to step {step}", check,
                                                  self.s.timeout_s)
            # Every process drops its newer copies (process 0 before it touches the root):
            # a newer step is then on no tier whole, whatever happens below.
            tier.drop(sorted(s for s in set(tier.copies) | set(tier.steps()) if s > step),
                      "rewound")
            tier.ancestry = ancestry
            super().rewind(step)
        finally:
            # Done or not, its event may be recorded: later copies record the new mark, the
            # one process 0 reads (the same on every process).
            try:
                tier.lineage = _coord.run_on_process_zero(
                    "read the lineage mark", lambda: read_lineage(self.root).mark,
                    self.s.timeout_s)
            except CkptError as exc:
                log.warning("could not read the lineage record of %s: %s", self.root.url,
                            exc)

    def restore(self, step: int, store: Store, target: Any, mesh: Any, item: str | None,
                deadline: Deadline | None, memory_budget: int | None = None) -> Any:
        """Each box from this process's copy where it holds it, the rest from the root; a
        copy that fails its checks falls back to the root's copy of the same save."""
        tier = self.tier
        source = tier.readable(step, store, item)
        folder = step_store(store, step)
        try:
            restored = restore_from(folder, target, mesh=mesh, item=item,
                                    deadline=deadline, opened=source,
                                    memory_budget=memory_budget)
        except CorruptCheckpointError as exc:
            if not isinstance(source, Tiered):
                raise
            # Damage in this host's copy (each of its chunks is checked): the root's copy
            # of the same save serves this process instead, if there is one.
            log.warning("step %d: the local copy in %s failed its checks (%s); reading the "
                        "persistent root instead", step, tier.store.url, exc)
            try:
                root = open_readable(folder, item)
            except CheckpointNotFoundError:
                raise exc from None
            if root.manifest.attempt != source.attempt:
                # Another save's step (the root's was replaced): mixing the two in one
                # restore could return a state that never existed.
                raise exc
            return restore_from(folder, target, mesh=mesh, item=item,
                                deadline=deadline, opened=root, memory_budget=memory_budget)
        me = _coord.current().process_index
        if isinstance(source, Tiered):
            log.info("restored step %d on process %d: %.1f MiB from the local tier %s, "
                     "%.1f MiB from the persistent root %s", step, me,
                     source.served["local"] / 2**20, tier.store.url,
                     source.served["root"] / 2**20, self.root.url)
        else:
            log.info("restored step %d on process %d from the persistent root %s alone (no "
                     "local copy of it)", step, me, self.root.url)
        return restored
