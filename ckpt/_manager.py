"""`CheckpointManager`: numbered steps under one root, one save in flight, retention, debris.

Layout: ``<root>/<step>/`` is an ordinary checkpoint (decimal step, no padding). A step is
committed when its COMMIT exists; nothing else about a step folder is trusted. Process 0
removes debris (attempts no COMMIT names) in the background when the manager starts, and
applies retention after each commit; every process may list and restore.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType
from typing import Any

from ckpt import _coord
from ckpt._housekeeping import (
    committed_steps,
    debris,
    delete_step,
    latest_committed_step,
    retention_victims,
    step_folders,
)
from ckpt._policy import SavePolicy
from ckpt._restore import open_checkpoint, restore_from
from ckpt._save import SaveHandle, start_save
from ckpt.errors import CheckpointNotFoundError, CkptError, SaveError
from storage import open_store


class CheckpointManager:
    """Saves and restores numbered steps of one training run under ``root_url``.

    Create it on every process with the same arguments; call `save` on every process with
    the same step. Use as a context manager so that the last save is waited for on exit.

    Args:
        root_url: the folder (or bucket prefix) holding one sub-folder per step.
        keep_last: keep the newest N committed steps (None keeps all).
        keep_every: also keep every step divisible by this (None: no such steps).
        keep_best: also keep the N best steps by ``best_metric`` (a metric passed to `save`).
        best_metric: the metric `keep_best` ranks by.
        best_mode: ``"min"`` (lower is better) or ``"max"``.
        save_every: `should_save` is True at steps divisible by this.
        save_every_seconds: `should_save` is True once this long has passed since the last
            save (decided on process 0 and shared, so all processes agree).
        watch_preemption: notice SIGTERM (and JAX's preemption notices in multi-process
            jobs); `should_save` and `reached_preemption` then agree on one step to stop at.
        timeout_s: how long processes wait for each other during a save.

    A training loop::

        for step in range(start, end):
            state = train_step(state)
            if mgr.should_save(step):
                mgr.save(step, state, metrics={"loss": loss})
            if mgr.reached_preemption(step):
                break  # step is committed; exit and let the job be restarted
    """

    def __init__(self, root_url: str | os.PathLike[str], keep_last: int | None = 3,
                 keep_every: int | None = None, *, keep_best: int | None = None,
                 best_metric: str | None = None, best_mode: str = "min",
                 save_every: int | None = None, save_every_seconds: float | None = None,
                 watch_preemption: bool = True,
                 timeout_s: float = _coord.DEFAULT_TIMEOUT_S) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
        if (keep_best is None) != (best_metric is None) or (keep_best or 1) < 1:
            raise ValueError("keep_best (>= 1) and best_metric go together")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.keep_best, self.best_metric, self.best_mode = keep_best, best_metric, best_mode
        self._policy = SavePolicy(save_every, save_every_seconds, watch_preemption)
        self._metrics: dict[int, dict[str, float]] = {}
        self._store = open_store(root_url)
        self._store.verify_access()  # fail now, not after the first training steps
        self.root_url = self._store.url
        self.keep_last, self.keep_every, self.timeout_s = keep_last, keep_every, timeout_s
        self._lock = threading.Lock()
        self._saving: set[int] = set()
        self._handle: SaveHandle | None = None
        self._gc: threading.Thread | None = None
        if _coord.current().process_index == 0:
            self._gc = threading.Thread(target=self._remove_debris, name="ckpt-manager-gc",
                                        daemon=True)
            self._gc.start()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.root_url!r}, keep_last={self.keep_last})"

    # -- listing ---------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """All committed steps, ascending (one existence check per step folder)."""
        return committed_steps(self._store)

    def latest_step(self) -> int | None:
        """The newest committed step, or None; checks step folders newest first."""
        return latest_committed_step(self._store)

    # -- saving ----------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether the loop should save ``step``: by ``save_every``, ``save_every_seconds``,
        or because it is the agreed preemption step. The same answer on every process."""
        return self._policy.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True, on every process at the same step, when the job is being preempted.

        Call once per step after saving (``should_save`` is True at that step). Returns
        only once the save in flight is committed, so the loop can exit at once.
        """
        if not self._policy.preempted_at(step):
            return False
        self.wait()
        return True

    def save(self, step: int, tree: Any, *, metadata: Any = None,
             metrics: dict[str, float] | None = None) -> SaveHandle:
        """Starts saving ``tree`` as ``step``; returns after the snapshot (see `save_async`).

        ``metrics`` (name -> number) are stored in the manifest; ``keep_best`` ranks by them.

        Waits first for the previous save of this manager; if that one failed and its error
        was never observed through its handle, raises that error now instead of saving.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        previous = self._handle
        if previous is not None:
            exc = previous.outcome()
            if exc is not None and not previous.observed_by_user:
                previous.observed_by_user = True
                raise SaveError(f"the previous save ({previous.url}) failed: {exc}") from exc
        if metrics is not None:
            bad = [k for k, v in metrics.items() if not isinstance(k, str)
                   or isinstance(v, bool) or not isinstance(v, (int, float))]
            if bad:
                raise ValueError(f"metrics must map names to numbers; bad entries: {bad}")
            self._metrics[step] = {k: float(v) for k, v in metrics.items()}
        with self._lock:
            self._saving.add(step)
        self._policy.saved()
        handle = start_save(self._store.child(str(step)), tree, metadata=metadata,
                            on_commit=self._apply_retention, timeout_s=self.timeout_s,
                            metrics=metrics)
        self._handle = handle
        return handle

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is committed.

        Raises:
            The save's error, unless it was already raised to the caller (by its handle's
            `wait`/`exception`, or by a later `save`): each failure is reported once.
        """
        handle = self._handle
        if handle is not None:
            exc = handle.outcome()
            if exc is not None and not handle.observed_by_user:
                handle.observed_by_user = True
                raise exc

    def _apply_retention(self) -> None:
        if _coord.current().process_index != 0:
            return
        steps = self.steps()
        best: list[int] = []
        if self.keep_best and self.best_metric:
            scored = [(v, s) for s in steps
                      if (v := self._metric(s, self.best_metric)) is not None]
            scored.sort(reverse=self.best_mode == "max")
            best = [s for _, s in scored[:self.keep_best]]
        for step in retention_victims(steps, self.keep_last, self.keep_every, best):
            delete_step(self._store, step)

    def _metric(self, step: int, name: str) -> float | None:
        if step not in self._metrics:
            try:
                _, manifest = open_checkpoint(self._store.child(str(step)))
                self._metrics[step] = manifest.metrics
            except CkptError:
                self._metrics[step] = {}
        return self._metrics[step].get(name)

    def _remove_debris(self) -> None:
        """Process 0, at start-up, in the background: deletes attempts no COMMIT names."""
        try:
            for step in step_folders(self._store):
                with self._lock:
                    # Holding the lock while deleting: a save of this step registers first
                    # (and is skipped) or starts after the deletion.
                    if step in self._saving:
                        continue
                    for attempt in debris(self._store, [step]):
                        self._store.delete_prefix(f"{step}/{attempt.name}")
        except CkptError:
            pass  # best effort: debris is invisible to readers; the next start or `ckpt gc`

    # -- restoring -------------------------------------------------------------------------

    def restore(self, step: int | None = None, target: Any = None, mesh: Any = None) -> Any:
        """Restores ``step`` (default: the latest committed one); see `ckpt.restore`."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointNotFoundError(f"no committed step under {self.root_url}")
        return restore_from(self._store.child(str(step)), target, mesh=mesh)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for the save in flight and for start-up debris removal."""
        try:
            self.wait()
        finally:
            if self._gc is not None:
                self._gc.join()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        else:
            try:
                self.close()
            except CkptError:
                pass  # the body's exception is the one to see
