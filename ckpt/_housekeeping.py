"""Steps under a manager root and attempts under a checkpoint: which are committed, what is
debris, what retention removes, and deleting them without racing a committer.

Shared by `CheckpointManager` (debris, retention, delete, rewind; on process 0) and by
``ckpt list`` / ``ckpt gc``. Nothing here is trusted but COMMIT: an attempt folder is debris
when no COMMIT names it, and it is deleted only under a removal claim (`ckpt._claims`).
"""

from __future__ import annotations

import calendar
import dataclasses
import logging
import time
from collections.abc import Iterable

from ckpt._claims import REMOVING, claim_kind, forget, remove_uncommitted, retire
from ckpt._format import ATTEMPT_PREFIX, COMMIT, REWIND, CommitRecord, pack, unpack
from ckpt.errors import CorruptCheckpointError
from storage import ObjectNotFoundError, Store

log = logging.getLogger("ckpt")


def step_folders(store: Store) -> list[int]:
    """Steps that have a folder under a manager root (committed or not), ascending."""
    steps = []
    for name in store.list_children():
        if name.isdigit() and (name == "0" or not name.startswith("0")):
            steps.append(int(name))
    return sorted(steps)


# -- rewind record ---------------------------------------------------------------------------
# A rewind writes <root>/REWIND (the steps it abandons) before it deletes any of them, and
# removes it once all are deleted; listings leave those steps out meanwhile, so a crash in the
# middle of a rewind never lets the abandoned branch become the newest step again.

def abandoned_steps(store: Store) -> set[int]:
    """Steps a rewind in progress (or interrupted) has abandoned; empty when none."""
    try:
        raw = unpack(store.read(REWIND), store.describe(REWIND))
    except ObjectNotFoundError:
        return set()
    steps = raw.get("abandoned") if isinstance(raw, dict) else None
    if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
        raise CorruptCheckpointError(f"{store.describe(REWIND)} is not a rewind record")
    return set(steps)


def write_rewind(store: Store, to_step: int, abandoned: list[int]) -> None:
    store.write(REWIND, pack({"to": to_step, "abandoned": abandoned, "at": time.time()}))


def finish_rewind(store: Store) -> None:
    """Deletes every step an interrupted or running rewind abandoned, newest first, then the
    record. Process 0 of a manager, before it saves anything."""
    for step in sorted(abandoned_steps(store), reverse=True):
        delete_checkpoint(store.child(str(step)))
    store.delete(REWIND)


def committed_steps(store: Store) -> list[int]:
    """Committed steps under a manager root, ascending (one existence check per folder)."""
    gone = abandoned_steps(store)
    return [s for s in step_folders(store)
            if s not in gone and store.exists(f"{s}/{COMMIT}")]


def latest_committed_step(store: Store) -> int | None:
    """The newest committed step: one listing, then existence checks newest first."""
    gone = abandoned_steps(store)
    for step in reversed(step_folders(store)):
        if step not in gone and store.exists(f"{step}/{COMMIT}"):
            return step
    return None


# -- attempts of one checkpoint --------------------------------------------------------------

def attempt_time(name: str) -> float | None:
    """The POSIX time an attempt id was made at (ids start ``attempt-YYYYmmddTHHMMSS-``)."""
    try:
        stamp = name[len(ATTEMPT_PREFIX):].split("-", 1)[0]
        return float(calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S")))
    except (ValueError, IndexError):
        return None


def committed_attempt(store: Store) -> str | None:
    """The attempt the checkpoint's COMMIT names, or None if it has no COMMIT.

    Raises:
        CorruptCheckpointError: COMMIT exists but cannot be read (then nothing of the
            checkpoint may be treated as debris).
    """
    try:
        raw = store.read(COMMIT)
    except ObjectNotFoundError:
        return None
    return CommitRecord.decode(raw, store.describe(COMMIT)).attempt


@dataclasses.dataclass(frozen=True)
class Attempt:
    """An attempt folder of a checkpoint.

    ``state``: ``committed`` (COMMIT names it), ``incomplete`` (still being written, or
    debris; also what a dead writer's late requests left after a removal), ``claimed``
    (claimed for commit but not committed: its committer is between claim and COMMIT, or
    died there).
    """

    store: Store
    name: str
    state: str
    created_at: float | None

    @property
    def committed(self) -> bool:
        return self.state == "committed"

    def age_s(self, now: float) -> float | None:
        return None if self.created_at is None else max(0.0, now - self.created_at)


def attempts(store: Store) -> list[Attempt]:
    """Every attempt folder of the checkpoint at ``store``; none if COMMIT is unreadable."""
    try:
        winner = committed_attempt(store)
    except CorruptCheckpointError:
        return []
    out = []
    for name in store.list_children():
        if not name.startswith(ATTEMPT_PREFIX):
            continue
        if name == winner:
            state = "committed"
        else:
            kind = claim_kind(store, name)
            state = "claimed" if kind is not None and kind != REMOVING else "incomplete"
        out.append(Attempt(store, name, state, attempt_time(name)))
    return out


def debris(store: Store, *, grace_s: float = 0.0, now: float | None = None) -> list[Attempt]:
    """Attempts of the checkpoint at ``store`` a cleaner may remove: no COMMIT names them, no
    committer claimed them, they hold more than a tombstone, and they are at least
    ``grace_s`` old (unknown age counts as old)."""
    now = time.time() if now is None else now
    out = []
    for a in attempts(store):
        age = a.age_s(now)
        if a.state == "incomplete" and (age is None or age >= grace_s):
            out.append(a)
    return out


def remove_debris(store: Store, *, grace_s: float, skip: Iterable[str] = ()) -> list[Attempt]:
    """Removes the debris of one checkpoint under removal claims; returns what it removed.
    Called by the manager's start-up clean-up on process 0."""
    skipped = set(skip)
    return [a for a in debris(store, grace_s=grace_s)
            if a.name not in skipped and remove_uncommitted(store, a.name)]


# -- retention and deletion ------------------------------------------------------------------

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


def delete_checkpoint(store: Store) -> None:
    """Deletes the checkpoint at ``store``: COMMIT first, so it is invisible before any of
    its data goes; then its committed attempt; then every other attempt it may remove.

    An attempt claimed for commit by another job is left (it may still commit: then the
    checkpoint reappears, whole). Crash-safe and idempotent.
    """
    try:
        winner = committed_attempt(store)
    except CorruptCheckpointError:
        winner = None  # an unreadable COMMIT names nothing that could be trusted
    if winner is not None:
        retire(store, winner)
    store.delete(COMMIT)
    if winner is not None:
        store.delete_prefix(winner)
        forget(store, winner)
    for a in attempts(store):
        remove_uncommitted(store, a.name)
    store.prune()
