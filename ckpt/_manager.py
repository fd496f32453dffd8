"""`CheckpointManager`: numbered steps of one run under one root; one save in flight;
retention; debris removal; delete and rewind. Where the steps live (the root alone, or a
local tier beside it) is its placement's business (`ckpt._placement`).

Layout: ``<root>/<step>/`` is an ordinary checkpoint (decimal step, no padding). A step is
committed when its COMMIT exists (and no interrupted rewind abandoned it); nothing else about
a step folder is trusted. Process 0 removes debris when the manager starts (in the
background) and applies retention after each commit, always under removal claims
(`ckpt._claims`), so that another job saving on the same root can fail loudly but never
commit a step that does not restore. Every process may list and restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import operator
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from types import TracebackType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ckpt import _coord
from ckpt._codecs import canonical
from ckpt._format import COMMIT, REWIND
from ckpt._handle import SaveHandle
from ckpt._housekeeping import (
    Attempt,
    abandoned,
    committed_steps,
    finish_rewind,
    is_abandoned,
    remove_debris,
    retention_victims,
    step_names,
    steps_near,
)
from ckpt._orbax import holds_foreign_files, orbax_step_metrics
from ckpt._placement import RootOnly, Setting, WithLocalTier
from ckpt._policy import SavePolicy
from ckpt._reader import open_checkpoint
from ckpt._restore import checked_budget
from ckpt._snapshot import DEFAULT_MEMORY_BUDGET, checked_options
from ckpt._tiers import LocalTier
from ckpt._tree import is_text
from ckpt._watch import DEFAULT_POLL_S, follow
from ckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    InvalidArgumentError,
    ManagerClosedError,
    ReadOnlyError,
    SaveError,
    StepOrderError,
    TargetMismatchError,
)
from ckpt.storage import Deadline, DeadlineStore, Store, StoreLike, open_store

log = logging.getLogger("ckpt.manager")


def as_step(step: Any) -> int:
    """A step number from what training loops hold: an int, a numpy integer, or a 0-d
    integer array (numpy or jax, e.g. an optimizer's step count).

    Raises:
        ValueError: anything else (a bool, a float, a negative number), naming it.
    """
    value: int | None = None
    if not isinstance(step, (bool, np.bool_)):
        try:
            value = operator.index(step)
        except TypeError:
            if getattr(step, "shape", None) == () and getattr(step, "dtype", None) is not None \
                    and np.dtype(step.dtype).kind in "iu":
                value = int(np.asarray(step))
    if value is None or value < 0:
        raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
    return value


def as_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A snapshot of ``metrics`` as plain floats: Python, numpy and 0-d jax numbers alike.

    Raises:
        InvalidArgumentError: a name that is not text, or a value that is not a real number
            (bools, arrays of more than one element, strings, ints beyond a float's range),
            listing every bad entry.
    """
    def number(v: Any) -> float | None:
        if isinstance(v, (bool, np.bool_)):
            return None
        try:
            if isinstance(v, (int, float)):
                return float(v)
            dtype = getattr(v, "dtype", None)
            # bfloat16 and the float8 types have numpy kind "V": ask jax what they are.
            if getattr(v, "shape", None) == () and dtype is not None and (
                    jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
                return float(np.asarray(v).astype(np.float64))
        except (OverflowError, TypeError, ValueError):
            return None  # an int beyond a float's range: not a number to rank by
        return None

    out = {k: number(v) for k, v in metrics.items() if is_text(k)}
    bad = [k for k in metrics if not is_text(k) or out.get(k) is None]
    if bad:
        raise InvalidArgumentError(
            f"metrics must map names to real numbers (Python, numpy or 0-d "
            f"jax); bad entries: {bad}")
    return {k: v for k, v in out.items() if v is not None}


# Every process makes its collective restores in the same order: the n-th has the same
# coordination key everywhere.
_RESTORES = itertools.count()


def _spans_processes(target: Any, mesh: Any) -> bool:
    """Whether a restore builds arrays that span processes (then every process takes part)."""
    me = jax.process_index()
    if mesh is not None and any(d.process_index != me for d in mesh.devices.flat):
        return True
    return any(not sharding.is_fully_addressable for sharding in (
        getattr(leaf, "sharding", None) for leaf in jax.tree_util.tree_leaves(target))
        if sharding is not None)


def _agree_on_restore(found: int | BaseException, target: Any, mesh: Any, item: str | None,
                      root: str, timeout_s: float) -> int:
    """`CheckpointManager.restore` on every process of a job whose restore builds arrays
    that span processes: the processes compare the step each resolved and a digest of
    their targets, and all fail together when they differ (config drift, or hosts resolving
    "latest" at different moments: one global array would otherwise hold shards of two
    states), or when one could not resolve its step. Returns the step.

    Raises:
        TargetMismatchError: on every process, naming what each process asked for.
        The error of a process that could not find its step (on every process).
    """
    coord = _coord.current()
    if coord.process_count == 1 or not _spans_processes(target, mesh):
        if isinstance(found, BaseException):
            raise found
        return found
    leaves = [(str(getattr(x, "shape", None)), str(getattr(x, "dtype", type(x).__name__)),
               repr(getattr(getattr(x, "sharding", None), "spec", None)))
              for x in jax.tree_util.tree_leaves(target)]
    digest = hashlib.sha256(repr([leaves, str(jax.tree_util.tree_structure(target)), item,
                                  None if mesh is None else repr(mesh.shape)]).encode())
    mine: Any = found if isinstance(found, BaseException) else {
        "step": found, "target": digest.hexdigest()[:16]}
    asked = coord.gather_all(f"manager-restore/{next(_RESTORES)}", mine, timeout_s,
                             f"restoring from {root}: ")
    assert not isinstance(found, BaseException)
    if all(v == asked[0] for v in asked.values()):
        return found
    raise TargetMismatchError(
        f"the processes of this job restore different steps or targets of {root} into the "
        "same global arrays; each must restore the same step onto the same target: "
        + "; ".join(f"process {p}: step {v['step']}, target {v['target']}"
                    for p, v in sorted(asked.items())))


class CheckpointManager:
    """Saves and restores numbered steps of one training run under ``root_url``.

    Create it on every process with the same arguments; call `save`, `delete` and `rewind`
    on every process with the same step. Use as a context manager (or call `close`) so that
    the last save is waited for and the SIGTERM handler is put back.

    Args:
        root_url: the folder (or bucket prefix) holding one sub-folder per step.
        keep_last: keep the newest N committed steps (None, the default, keeps all).
        keep_every: also keep every step divisible by this (None: no such steps).
        read_only: list and restore only: never write, delete or install a signal handler
            (for evaluators and notebooks opened on a live run's root).
        keep_best: also keep the N best steps by ``best_metric`` (a metric passed to `save`;
            NaN or missing never ranks as best).
        best_metric: the metric `keep_best` and `best_step` rank by.
        best_mode: ``"min"`` (lower is better) or ``"max"``.
        save_every: `should_save` is True at steps divisible by this.
        save_every_seconds: `should_save` is True once this long has passed since the last
            save (decided on process 0 and shared, so all processes agree). With either
            set, `save` saves only the steps `should_save` says (unless ``force=True``).
        watch_preemption: notice SIGTERM (and JAX's preemption notices in multi-process
            jobs); `should_save` and `reached_preemption` then agree on one step to stop at.
        timeout_s: the bound on each save, end to end, in seconds (see `ckpt.save_async`).
        debris_grace_s: at start-up, remove uncommitted attempts at least this old (default
            0: all of them; a save of another job caught mid-way fails loudly, see
            docs/protocol.md).
        snapshot, memory_budget: how each save copies the arrays off the devices and the
            host memory it may use for them (see `ckpt.save_async`).
        compression: each save's, on both tiers (None, ``"zstd"`` or ``"zstd:<level>"``; see
            `ckpt.save_async`). Steps saved with other settings restore all the same.
        local_dir: a path on each host's own disk (or RAM disk), the same on every host
            (``{process}`` in it is replaced by the process index): every save is committed
            there first, each process writing every shard its devices hold, and `restore`
            reads from it whatever it holds (docs/tiers.md). With it, `latest_step`,
            `steps` and `restore` cover both tiers, and the manager must be made on every
            process (they compare their local copies at start-up).
        local_keep: local steps kept (the newest; at least 1).
        persist_every: with ``local_dir``, only steps divisible by this (and a preemption
            step) are also committed to ``root_url``, in the background from the local
            copy; None: every step.
        local_replicas: with ``local_dir``, each process's local copy also holds the
            shards of this many other processes, sent over JAX's collectives during
            `save` (docs/tiers.md, "Peer replicas"); 0: none.
        local_domains: each process's failure domain (a host name, a rack, a slice), one
            per process: no domain then holds two copies of any process's shards. None:
            each process's replicas go to the processes ``k * n // (local_replicas + 1)``
            further on (one replica: half the job away).

    A training loop::

        for step in range(start, end):
            state = train_step(state)
            if mgr.should_save(step):
                mgr.save(step, state, metrics={"loss": loss})
            if mgr.reached_preemption(step):
                break  # step is committed; exit and let the job be restarted
    """

    def __init__(self, root_url: StoreLike, keep_last: int | None = None,
                 keep_every: int | None = None, *, read_only: bool = False,
                 keep_best: int | None = None, best_metric: str | None = None,
                 best_mode: str = "min", save_every: int | None = None,
                 save_every_seconds: float | None = None, watch_preemption: bool = True,
                 timeout_s: float = _coord.DEFAULT_TIMEOUT_S,
                 debris_grace_s: float = 0.0, snapshot: str = "auto",
                 memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 local_dir: str | os.PathLike[str] | None = None, local_keep: int = 2,
                 persist_every: int | None = None,
                 compression: str | None = None, local_replicas: int = 0,
                 local_domains: Sequence[Hashable] | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise InvalidArgumentError(f"keep_last must be >= 1 or None, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise InvalidArgumentError(f"keep_every must be >= 1 or None, got {keep_every}")
        if keep_best is not None and (best_metric is None or keep_best < 1):
            raise InvalidArgumentError("keep_best must be >= 1 and needs best_metric")
        if best_mode not in ("min", "max"):
            raise InvalidArgumentError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.keep_best, self.best_metric, self.best_mode = keep_best, best_metric, best_mode
        self.read_only = read_only
        self._store = open_store(root_url)
        try:
            self._store.verify_access()  # fail now, not after the first training steps
        except CkptError as exc:
            if local_dir is None:
                raise
            # The local tier's start-up is collective: the error reaches every process
            # there instead of leaving the others waiting for this one.
            access: CkptError | None = exc
        else:
            access = None
        self.root_url = self._store.url
        self.keep_last, self.keep_every, self.timeout_s = keep_last, keep_every, timeout_s
        self.debris_grace_s = debris_grace_s
        self.snapshot, self.memory_budget = snapshot, checked_options(snapshot, memory_budget)
        if local_dir is None and persist_every is not None:
            raise InvalidArgumentError(
                "persist_every needs local_dir (without a local tier every "
                "save goes to root_url)")
        if local_dir is None and (local_replicas or local_domains is not None):
            raise InvalidArgumentError(
                "local_replicas and local_domains need local_dir (they place copies of "
                "each process's local copy with other processes)")
        self._metrics: dict[int, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._saving: set[str] = set()  # attempt ids of this manager's saves in flight
        self._handle: SaveHandle | None = None
        self._gc: threading.Thread | None = None
        self._closed = False
        self._watching = threading.Event()  # set by `close`: every `watch` ends
        setting = Setting(root=self._store, timeout_s=timeout_s, snapshot=snapshot,
                          memory_budget=self.memory_budget,
                          compression=canonical(compression), refuse=self._refusal,
                          victims=self._retention_victims, saved=self._saved,
                          finished=self._finished, removed=self._removed)
        self._place: RootOnly = RootOnly(setting)
        self._policy = SavePolicy(save_every, save_every_seconds,
                                  watch_preemption and not read_only)
        try:
            # Before an interrupted rewind is finished below: each process drops its copies
            # of the steps the rewind abandoned while the record still names them.
            if local_dir is not None:
                self._place = WithLocalTier(setting, LocalTier(
                    os.fspath(local_dir), local_keep, persist_every, self._store,
                    read_only=read_only, timeout_s=timeout_s, failure=access,
                    replicas=local_replicas, domains=local_domains))
            if not read_only and _coord.current().process_index == 0:
                if self._store.exists(REWIND):
                    # A rewind was interrupted: finish it before any save can land on its
                    # branch.
                    finish_rewind(self._store)
                self._gc = threading.Thread(target=self._remove_debris,
                                            name="ckpt-manager-gc", daemon=True)
                self._gc.start()
        except BaseException:
            # A manager that was never made must not keep SIGTERM from ending the process.
            self._closed = True
            self._policy.close()
            raise

    def __repr__(self) -> str:
        return (f"CheckpointManager({self.root_url!r}, keep_last={self.keep_last}"
                + (", read_only=True)" if self.read_only else ")"))

    # -- listing ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """All committed steps, ascending (one existence check per step folder); with a
        local tier, also the steps whose local copies serve on every process."""
        return self._place.steps()

    def latest_step(self) -> int | None:
        """The newest committed step, or None; checks step folders newest first. With a
        local tier: the newest step restorable from the tiers (the root's newest, or a
        newer one whose local copies serve on every process)."""
        return self._place.newest(self._store)

    def watch(self, after: int | None = None, timeout_s: float | None = None,
              poll_s: float = DEFAULT_POLL_S) -> Iterator[int]:
        """Yields each committed step above ``after`` (None: every step, the ones already
        there first), once, in ascending order, as the run commits them: for an evaluator
        on a read-only manager beside the trainer. On any process; lists the root every
        ``poll_s`` seconds while no new step is there (one listing, three small reads, and
        a look at each step folder above the last step yielded), and each step it listed
        is looked at once more before it is yielded (one listing, two small reads).

        Never yields a step that is being written or removed (one is listed once its
        COMMIT is there; a removal deletes COMMIT first). A step the trainer's retention
        removes before the watch reaches it is skipped (a warning names it); one it removes
        after it was yielded is the caller's to handle (its restore raises
        `CheckpointNotFoundError`). After a rewind of the run below the last step yielded,
        the watch follows the new branch from the step rewound to. Ends when ``timeout_s``
        passes with no new step (measured from when the caller asks for the next one;
        None: never) or when the manager is closed.

        Raises:
            InvalidArgumentError: ``poll_s`` not above 0, ``timeout_s`` below 0.
            StorageError: the root could not be listed (after the store's own retries).
        """
        after = None if after is None else as_step(after)
        return follow(self._store, self._place.steps, self._place.holds, after=after,
                      timeout_s=timeout_s, poll_s=poll_s, stop=self._watching)

    # -- saving ----------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether the loop should save ``step``: by ``save_every``, ``save_every_seconds``,
        or because it is the agreed preemption step. The same answer on every process, and
        the same answer `save` acts on for that step (asking both is fine)."""
        return self._policy.should_save(as_step(step))

    def reached_preemption(self, step: int) -> bool:
        """True, on every process at the same step, when the job is being preempted.

        Call once per step after saving (``should_save`` is True at that step). Returns
        only once the save in flight is committed, so the loop can exit at once.
        """
        if not self._policy.preempted_at(as_step(step)):
            return False
        self.wait()
        return True

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"cannot {what}: {self.root_url} was opened read_only=True")
        if self._closed:
            raise ManagerClosedError(f"cannot {what}: the CheckpointManager of "
                                     f"{self.root_url} was closed")

    def _previous_failure(self, previous: SaveHandle | None | bool = False) -> None:
        """Waits for the save in flight (or ``previous``); raises its error if nobody has
        seen it yet."""
        if previous is False:
            previous = self._handle
        if isinstance(previous, SaveHandle):
            exc = previous.outcome()
            if exc is not None and not previous.observed_by_user \
                    and self._place.raised_by_next_save(previous):
                previous.mark_observed()
                raise SaveError(f"the previous save ({previous.url}) failed: {exc}") from exc

    def save(self, step: int, tree: Any, *, metadata: Any = None,
             metrics: dict[str, float] | None = None,
             force: bool = False) -> SaveHandle | None:
        """Starts saving ``tree`` as ``step``; returns after the snapshot (see `save_async`).

        With a save policy (``save_every``, ``save_every_seconds``), a step the policy does
        not pick (`should_save`) is not saved and None is returned, unless ``force``; without
        one, every call saves. ``step`` may be a numpy or 0-d jax integer. ``metrics`` (name
        -> Python, numpy or 0-d jax number) are stored in the manifest; ``keep_best`` and
        `best_step` rank by them, `metrics` reads them back. ``step`` must be above the
        newest committed step: to go back (after a loss spike), `rewind` first.

        Waits first for the previous save of this manager; if that one failed and its error
        was never observed through its handle, raises that error now instead of saving.

        Raises:
            StepOrderError: ``step`` is below the newest committed step.
            CheckpointExistsError: ``step`` is the newest committed step.
            ReadOnlyError: the manager is read-only.
        """
        self._writable(f"save step {step}")
        step = as_step(step)
        metrics = as_metrics(metrics) if metrics is not None else None
        self._previous_failure()
        if not force and self._policy.scheduled and not self._policy.should_save(step):
            log.debug("step %d not saved: the schedule does not pick it (force=True saves "
                      "it)", step)
            return None
        drawn: list[str] = []

        def draw(attempt: str) -> None:
            with self._lock:
                self._saving.add(attempt)
            drawn.append(attempt)

        try:
            if isinstance(self._place, WithLocalTier):
                # The preemption step is always persisted.
                handle = self._place.save(step, tree, metadata, metrics, draw, drawn,
                                          persist=self._policy.preempted_at(step))
            else:
                handle = self._place.save(step, tree, metadata, metrics, draw, drawn)
        except BaseException:
            with self._lock:
                self._saving.difference_update(drawn)
            raise
        self._policy.saved()
        self._handle = handle
        return handle

    def _refusal(self, step: int) -> CkptError | None:
        """Process 0, before a save: the error that stops saving ``step``, if any."""
        if step in abandoned(self._store):
            # A committer paused across a rewind may have committed this step of the
            # abandoned branch since: remove it so that the new branch can save the step.
            finish_rewind(self._store)
        newest = self.latest_step()
        if (newest is None or step > newest) and holds_foreign_files(self._store.child(str(step))):
            return CheckpointExistsError(
                f"step {step} under {self.root_url} holds files this library did not write "
                f"(an Orbax save that never committed or is still running, or what is left "
                f"of a deleted one): it never writes into an Orbax folder; once no Orbax job "
                f"writes there, remove {self._store.child(str(step)).url} and save again")
        if newest is None or step > newest:
            return None
        if step == newest:
            return CheckpointExistsError(
                f"step {step} is already committed under {self.root_url}; to save it again, "
                f"delete it first (mgr.delete({step})) or rewind to an earlier step")
        return StepOrderError(
            f"step {step} is below step {newest}, the newest committed step under "
            f"{self.root_url}; to continue the run from an earlier step (e.g. after a loss "
            f"spike), call mgr.rewind(<that step>) first: it removes the steps above it")

    def _saved(self, step: int, metrics: dict[str, float] | None) -> None:
        """Every process, once ``step`` committed to the root: its metrics (for ranking)."""
        self._metrics[step] = dict(metrics or {})

    def _finished(self, drawn: list[str]) -> None:
        """Every process, once a save's attempts are no longer in flight."""
        with self._lock:
            self._saving.difference_update(drawn)

    def _removed(self, steps: list[int]) -> None:
        """Every process, once ``steps`` left the run."""
        for step in steps:
            self._metrics.pop(step, None)

    def cancel(self) -> bool:
        """Cancels the manager's saves in flight: the last save and, with a local tier, the
        commit of a step to the root under way (its step stays on the local tier only).
        Each stops at its next chunk boundary on every process, commits nothing and
        removes its attempt (`SaveHandle.cancel`); returns once they have stopped touching
        storage. Call on any process. Their outcomes count as seen: the next `save`,
        `wait` and `close` do not raise them.

        Returns:
            True when a save in flight was stopped before it committed; False when none
            was in flight, or each committed first.
        """
        stopped = False
        seen: set[int] = set()
        while True:
            # A local save that commits while it is cancelled starts its root's commit:
            # the list is asked again until it names nothing new.
            handles = [h for h in (self._handle, *self._place.pending())
                       if h is not None and id(h) not in seen]
            if not handles:
                return stopped
            for handle in handles:
                seen.add(id(handle))
                if not handle.done():  # a failure from before stays for `wait` to raise
                    stopped = handle.cancel() or stopped

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is committed; with a local tier, also
        the commit to the persistent root under way.

        Raises:
            The save's error, unless it was already raised to the caller (by its handle's
            `wait`/`exception`, or by a later `save`): each failure is reported once.
        """
        # The local save starts the root's commit once it committed: the placement is
        # asked for it only after the save's handle finished.
        def handles() -> Iterator[SaveHandle | None]:
            yield self._handle
            if self._handle is not None:
                self._handle.outcome()
            yield from self._place.pending()

        for handle in handles():
            if handle is not None:
                exc = handle.outcome()
                if exc is not None and not handle.observed_by_user:
                    handle.mark_observed()
                    raise exc

    def _retention_victims(self) -> list[int]:
        """Process 0, after each commit: the root's steps retention removes."""
        steps = committed_steps(self._store)
        best: list[int] = []
        if self.keep_best and self.best_metric:
            names = self._names_for(steps)
            scored = [(v, s) for s in steps
                      if (v := self._metric(s, self.best_metric, names)) is not None]
            scored.sort(reverse=self.best_mode == "max")
            best = [s for _, s in scored[:self.keep_best]]
        return retention_victims(steps, self.keep_last, self.keep_every, best)

    def _names_for(self, steps: list[int]) -> dict[int, str] | None:
        """The root's step folders (one listing) when a step of ``steps`` has metrics not
        yet read, so that reading them costs no listing per step."""
        return step_names(self._store) if any(s not in self._metrics for s in steps) else None

    def _metric(self, step: int, name: str,
                names: dict[int, str] | None = None) -> float | None:
        """``name`` of a committed step (from its manifest if this manager did not save it);
        None when missing or NaN, or when the checkpoint is damaged: those never rank.

        Raises:
            StorageError: the manifest could not be read now; retention skips this round
                rather than delete a step whose rank it does not know.
        """
        try:
            value = self._step_metrics(step, names).get(name)
        except (CorruptCheckpointError, CheckpointNotFoundError):
            return None  # damaged, or deleted meanwhile: nothing to rank
        return None if value is None or math.isnan(value) else value

    def _step_metrics(self, step: int,
                      names: dict[int, str] | None = None) -> dict[str, float]:
        """The metrics saved with committed ``step``: remembered from this manager's own
        saves, else read from the step's manifest once."""
        if step not in self._metrics:
            folder = self._place.folder(step, names)
            if folder.exists(COMMIT):
                self._metrics[step] = open_checkpoint(folder)[1].metrics
            else:  # an Orbax step: what its manager recorded, without opening its items
                self._metrics[step] = orbax_step_metrics(folder)
        return self._metrics[step]

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with committed ``step`` (empty if none were given).

        Raises:
            CheckpointNotFoundError: ``step`` is not a committed step.
        """
        step = as_step(step)
        if step not in self.steps():
            raise CheckpointNotFoundError(
                f"step {step} is not a committed step under {self.root_url}")
        return dict(self._step_metrics(step))

    def best_step(self) -> int | None:
        """The committed step with the best ``best_metric`` (by ``best_mode``; the newest
        of equals), or None when no committed step has that metric (NaN never counts).

        Raises:
            ValueError: the manager was made without ``best_metric``.
        """
        if self.best_metric is None:
            raise InvalidArgumentError(
                "best_step needs a metric to rank by: "
                "CheckpointManager(..., best_metric='loss', best_mode='min')")
        steps = self.steps()
        names = self._names_for(steps)
        scored = [(v, s) for s in steps
                  if (v := self._metric(s, self.best_metric, names)) is not None]
        if not scored:
            return None
        sign = -1.0 if self.best_mode == "max" else 1.0
        return min(scored, key=lambda vs: (sign * vs[0], -vs[1]))[1]

    def _keeps(self, attempt: Attempt) -> bool:
        """Whether start-up clean-up must leave ``attempt``: it is a save of this manager's
        (process 0 registers each attempt id before any process writes under it). Older
        debris of a step this manager saves again goes like any other."""
        with self._lock:
            return attempt.name in self._saving

    def _remove_debris(self) -> None:
        """Process 0, at start-up, in the background: removes uncommitted attempts."""
        try:
            for step, name in step_names(self._store).items():
                # Asked per attempt after it was listed: a save that starts meanwhile
                # registers its attempt id before anything is written under it, so an
                # attempt of it that the listing saw is registered by then and kept.
                removed = remove_debris(self._store.child(name),
                                        grace_s=self.debris_grace_s,
                                        keep=self._keeps)
                if removed:
                    log.info("clean-up: removed uncommitted attempts %s of step %d under %s",
                             removed, step, self.root_url)
        except CkptError as exc:
            # Best effort: debris is invisible to readers; the next start or `ckpt gc`.
            log.warning("debris removal under %s stopped: %s", self.root_url, exc)

    # -- deleting and rewinding ------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Deletes ``step`` (recorded in LINEAGE, then COMMIT first, so it is never half
        there). Call on every process.

        Raises:
            CheckpointNotFoundError: ``step`` is not a committed step.
            ReadOnlyError: the manager is read-only.
        """
        self._writable(f"delete step {step}")
        step = as_step(step)
        self._previous_failure()
        self._place.settle()
        self._place.delete(step)

    def rewind(self, step: int) -> None:
        """Makes ``step`` the newest committed step: every committed step above it leaves
        the run, and later saves and retention follow the new branch. Call on every process.

        Crash-safe: the steps to abandon are recorded at the root first (listings leave them
        out from then on), then deleted newest first, then the record is removed; a manager
        starting on the root finishes an interrupted rewind before anything else.

        Raises:
            CheckpointNotFoundError: ``step`` is not a committed step.
            ReadOnlyError: the manager is read-only.
        """
        self._writable(f"rewind to step {step}")
        step = as_step(step)
        self._previous_failure()
        self._place.settle()
        self._place.rewind(step)
        self._removed([s for s in self._metrics if s > step])

    # -- restoring -------------------------------------------------------------------------

    def restore(self, step: int | None = None, target: Any = None, mesh: Any = None, *,
                item: str | None = None, timeout_s: float | None = None,
                memory_budget: int | None = None) -> Any:
        """Restores ``step`` (default: the latest committed one); see `ckpt.restore`
        (``item``: one item of an Orbax step, or one top-level key of this library's;
        ``memory_budget``: host memory for array data at once, read in waves).
        ``timeout_s`` bounds finding the step too."""
        memory_budget = checked_budget(memory_budget)
        store = self._store
        deadline = None
        if timeout_s is not None:
            deadline = Deadline(timeout_s, f"restoring from {self.root_url}")
            store = DeadlineStore(store, deadline)
        found: int | BaseException
        try:
            found = self._step_to_restore(store, step)
        except CkptError as exc:
            found = exc
        asked = step
        step = _agree_on_restore(found, target, mesh, item, self.root_url,
                                 deadline.remaining() if deadline else self.timeout_s)
        try:
            return self._place.restore(step, store, target, mesh, item, deadline,
                                       memory_budget)
        except CheckpointNotFoundError as exc:
            if asked is None:
                raise
            # A mistyped step: the root's committed steps around it say what was meant (with
            # a local tier, after what the tiers said).
            try:
                steps = committed_steps(store)
            except CkptError:
                raise exc from None  # no hint then: the error the restore met stands
            if step in steps:
                raise
            said = (str(exc) if isinstance(self._place, WithLocalTier)
                    else f"no committed step {step} under {self.root_url}")
            raise CheckpointNotFoundError(f"{said} ({steps_near(steps, step)})") from exc

    def _step_to_restore(self, store: Store, step: int | None) -> int:
        """The step `restore` reads: ``step``, or the newest.

        Raises:
            CheckpointNotFoundError: no such committed step.
        """
        if step is None:
            newest = self._place.newest(store)
            if newest is None:
                raise CheckpointNotFoundError(
                    f"no committed step under {self.root_url}"
                    + (" or in its local tier" if isinstance(self._place, WithLocalTier)
                       else ""))
            return newest
        if is_abandoned(store, step := as_step(step), abandoned(store)):
            raise CheckpointNotFoundError(f"step {step} under {self.root_url} was abandoned "
                                          "by a rewind")
        return step

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for the save in flight and for start-up debris removal; gives SIGTERM back
        to the handler that was there before (once the last manager watching it closes)."""
        self._watching.set()
        try:
            self.wait()
        finally:
            if self._gc is not None:
                self._gc.join()
            if not self._closed:
                self._closed = True
                self._policy.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        else:
            with contextlib.suppress(CkptError):  # the body's exception is the one to see
                self.close()
