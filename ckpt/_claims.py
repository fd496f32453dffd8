"""Fencing between a committer and a cleaner: one create-if-absent claim per attempt.

An uncommitted attempt folder is either a save still running (perhaps in a paused or zombie
process of another job) or debris. No age or liveness check can tell them apart, so they race
for one object instead, ``claims/<attempt>`` beside the attempt folder, created if absent:

- the **committer** (process 0 of the save, or an offline rewrite) creates it with the
  claim ``commit`` after every chunk, host report and the manifest are durable and before it
  creates ``COMMIT``; if a claim is already there it gives up (`AttemptRemovedError`);
- a **cleaner** (manager start-up, retention, ``ckpt gc``, rewind, delete) creates it with the
  claim ``remove`` before it deletes anything of the attempt; it deletes only if its claim won
  or the claim there already says ``remove``, and it never deletes the ``remove`` claim
  itself, which stays as a tombstone so that a committer waking up later still finds it.

Exactly one kind of claim can exist, so an attempt is committed only if no cleaner ever
deleted any of it, and a cleaner deletes only what can never commit. The one exception is the
attempt a COMMIT names: its committer has finished, so whoever removes that COMMIT (retention,
rewind, delete, overwrite) first turns its claim into ``remove``. docs/protocol.md has the
two-job analysis.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

from ckpt._format import CLAIMS, MAX_COMMIT_BYTES, pack, read_object, unpack
from ckpt.errors import AttemptRemovedError, CkptError
from ckpt.storage import ObjectNotFoundError, Store

log = logging.getLogger("ckpt.claims")

COMMITTING = "commit"
REMOVING = "remove"

# Who removes an attempt under its committer, and what to do about it: the end of every
# error that reports one (`claim_commit`, a save whose writes failed under the removal).
REMOVED_BY_ANOTHER = ("another writable CheckpointManager opened on this root (or its local "
                      "folder) cleaned it up, or `ckpt gc` did; nothing was committed. One "
                      "writer per root: evaluators and notebooks open it with read_only=True")


def _record(kind: str) -> bytes:
    # A random token makes every claim unique, so that a store retrying a create-if-absent
    # whose answer was lost can tell its own claim from another's.
    return pack({"claim": kind, "token": secrets.token_hex(8), "at": time.time(),
                 "host": socket.gethostname(), "pid": os.getpid()})


def claim_key(attempt: str) -> str:
    return f"{CLAIMS}/{attempt}"


def claim_kind(store: Store, attempt: str) -> str | None:
    """The claim on ``attempt`` (``commit``, ``remove``), None if unclaimed, ``?`` if unreadable."""
    key = claim_key(attempt)
    try:
        raw = unpack(read_object(store, key, MAX_COMMIT_BYTES), store.describe(key))
    except ObjectNotFoundError:
        return None
    except CkptError as exc:
        log.warning("cannot read the claim on %s (%s); treating it as a commit claim",
                    store.describe(attempt), exc)
        return "?"
    kind = raw.get("claim") if isinstance(raw, dict) else None
    return kind if kind in (COMMITTING, REMOVING) else "?"


def claim_commit(store: Store, attempt: str) -> None:
    """Claims ``attempt`` for commit. Called by the committer, once its manifest is durable
    and before it creates COMMIT.

    Raises:
        AttemptRemovedError: a cleaner claimed the attempt first; it may be partly deleted.
    """
    if not store.write_if_absent(claim_key(attempt), _record(COMMITTING)):
        raise AttemptRemovedError(
            f"{store.describe(attempt)} was claimed for removal before it could commit: "
            f"{REMOVED_BY_ANOTHER}")


def claim_removal(store: Store, attempt: str) -> bool:
    """Claims ``attempt`` for removal; True if the caller may now delete its data.

    False when a committer claimed it: it may still commit (or its committer died in the
    moment between claim and COMMIT), so it is left alone.
    """
    if store.write_if_absent(claim_key(attempt), _record(REMOVING)):
        return True
    return claim_kind(store, attempt) == REMOVING


def retire(store: Store, attempt: str) -> None:
    """Turns the claim of an attempt whose committer has finished into ``remove``.

    Called before the COMMIT naming ``attempt`` is deleted or replaced, and by a committer
    on its own attempt after it lost the race for COMMIT: in both cases nobody can ever
    commit ``attempt`` again, so overwriting the claim races with nothing.
    """
    store.write(claim_key(attempt), _record(REMOVING))


def delete_data(store: Store, attempt: str) -> None:
    """Deletes the folder of a removal-claimed ``attempt``; its claim stays (the tombstone).

    Idempotent: objects a dead writer's late requests still add are removed by the next call.
    """
    store.delete_prefix(attempt)


def forget(store: Store, attempt: str) -> None:
    """Deletes the claim of an attempt that was committed and is now deleted: its committer
    finished long ago, so no tombstone is needed."""
    store.delete(claim_key(attempt))
    store.prune(CLAIMS)


def remove_uncommitted(store: Store, attempt: str) -> bool:
    """Claims and deletes an attempt no COMMIT names; False (nothing deleted) if a committer
    holds it. Called by every cleaner on every attempt it did not see committed."""
    if not claim_removal(store, attempt):
        log.info("leaving %s: claimed for commit", store.describe(attempt))
        return False
    delete_data(store, attempt)
    return True
