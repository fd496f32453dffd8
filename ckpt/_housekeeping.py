"""Steps under a manager root: which are committed, what is debris, what retention removes.

Shared by `CheckpointManager` (debris at start-up, retention after each commit, on process 0)
and by ``ckpt list`` / ``ckpt gc``. Nothing here is trusted but COMMIT: an attempt folder is
debris exactly when no COMMIT names it.
"""

from __future__ import annotations

import calendar
import dataclasses
import time
from collections.abc import Iterable

from ckpt._format import ATTEMPT_PREFIX, COMMIT, CommitRecord
from ckpt.errors import CorruptCheckpointError
from storage import ObjectNotFoundError, Store


def step_folders(store: Store) -> list[int]:
    """Steps that have a folder under a manager root (committed or not), ascending."""
    steps = []
    for name in store.list_children():
        if name.isdigit() and (name == "0" or not name.startswith("0")):
            steps.append(int(name))
    return sorted(steps)


def committed_steps(store: Store) -> list[int]:
    """Committed steps under a manager root, ascending (one existence check per folder)."""
    return [s for s in step_folders(store) if store.exists(f"{s}/{COMMIT}")]


def latest_committed_step(store: Store) -> int | None:
    """The newest committed step: one listing, then existence checks newest first."""
    for step in reversed(step_folders(store)):
        if store.exists(f"{step}/{COMMIT}"):
            return step
    return None


def attempt_time(name: str) -> float | None:
    """The POSIX time an attempt id was made at (ids start ``attempt-YYYYmmddTHHMMSS-``)."""
    try:
        stamp = name[len(ATTEMPT_PREFIX):].split("-", 1)[0]
        return float(calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S")))
    except (ValueError, IndexError):
        return None


def committed_attempt(store: Store, step: int) -> str | None:
    """The attempt COMMIT names in ``step``, or None if the step has no COMMIT.

    Raises:
        CorruptCheckpointError: COMMIT exists but cannot be read (then nothing of the step
            may be treated as debris).
    """
    try:
        raw = store.read(f"{step}/{COMMIT}")
    except ObjectNotFoundError:
        return None
    return CommitRecord.decode(raw, store.describe(f"{step}/{COMMIT}")).attempt


@dataclasses.dataclass(frozen=True)
class Attempt:
    """An attempt folder of a step: the committed one, or debris."""

    step: int
    name: str
    committed: bool
    created_at: float | None

    def age_s(self, now: float) -> float | None:
        return None if self.created_at is None else max(0.0, now - self.created_at)


def attempts(store: Store, step: int) -> list[Attempt]:
    """Every attempt folder of ``step``; a step with an unreadable COMMIT reports none."""
    try:
        winner = committed_attempt(store, step)
    except CorruptCheckpointError:
        return []
    return [Attempt(step, name, name == winner, attempt_time(name))
            for name in store.list_children(str(step)) if name.startswith(ATTEMPT_PREFIX)]


def debris(store: Store, steps: Iterable[int], *, grace_s: float = 0.0,
           now: float | None = None) -> list[Attempt]:
    """Uncommitted attempts of ``steps`` at least ``grace_s`` old (unknown age counts as old)."""
    now = time.time() if now is None else now
    out = []
    for step in steps:
        for a in attempts(store, step):
            age = a.age_s(now)
            if not a.committed and (age is None or age >= grace_s):
                out.append(a)
    return out


def retention_victims(steps: list[int], keep_last: int | None, keep_every: int | None,
                      best: Iterable[int] = ()) -> list[int]:
    """Committed steps that ``keep_last``, ``keep_every`` and ``best`` (steps to keep for
    their metric) do not keep. The newest step always stays."""
    keep = set(steps[-keep_last:] if keep_last else steps)
    keep.update(best)
    if steps:
        keep.add(steps[-1])
    if keep_every:
        keep.update(s for s in steps if s % keep_every == 0)
    return [s for s in steps if s not in keep]


def delete_step(store: Store, step: int) -> None:
    """Deletes a step: COMMIT first, so it is invisible before any of its data goes."""
    store.delete(f"{step}/{COMMIT}")
    store.delete_prefix(str(step))
