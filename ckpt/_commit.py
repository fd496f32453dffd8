"""The last step of every write: manifest, commit claim, then COMMIT (created if absent, or
replaced).

Called on process 0 only: by the save path once every process has reported its chunks, and
by offline rewrites (`ckpt reshard`). See docs/protocol.md.
"""

from __future__ import annotations

import functools
import logging
import time
from importlib import metadata as dist_metadata
from typing import Any

from ckpt._claims import REMOVING, claim_commit, claim_kind, delete_data, forget, retire
from ckpt._format import (
    COMMIT,
    MANIFEST,
    MAX_COMMIT_BYTES,
    CommitRecord,
    LeafRecord,
    Manifest,
    encode_manifest,
    read_object,
    sha256,
)
from ckpt.errors import AttemptRemovedError, CommitConflictError, CommitOutcomeUnknownError
from ckpt.storage import DeadlineStore, ObjectNotFoundError, StorageError, Store

log = logging.getLogger("ckpt.commit")


@functools.cache
def versions() -> dict[str, str]:
    """Versions of the writing software, recorded in every manifest."""
    out = {}
    for dist in ("shardckpt", "jax", "jaxlib", "tensorstore", "numpy"):
        try:
            out[dist] = dist_metadata.version(dist)
        except dist_metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def commit(store: Store, *, attempt: str, records: list[LeafRecord], metadata: Any,
           created_at: float, process_count: int, overwrite: bool = False,
           metrics: dict[str, float] | None = None,
           local: dict[str, Any] | None = None,
           parents: list[list[Any]] | None = None) -> None:
    """Writes ``<attempt>/manifest.msgpack``, claims the attempt, then makes it the checkpoint.

    Without ``overwrite``, COMMIT is created only if absent: of concurrent attempts exactly
    one wins; a loser retires its own attempt (deletes it) and gets `CommitConflictError`.
    With ``overwrite``, COMMIT is replaced atomically (readers see the old checkpoint until
    then, the new one after), then the old attempt is deleted.

    Raises:
        AttemptRemovedError: a cleaner claimed ``attempt`` first (see `ckpt._claims`), or
            removed it while COMMIT was being created.
        CommitConflictError: another attempt holds COMMIT (without ``overwrite``).
        CommitOutcomeUnknownError: creating COMMIT failed and COMMIT names no attempt yet:
            the request may still land, so the attempt is kept (it shows as ``claimed``) and
            COMMIT decides.
        DeadlineExceededError: ``store``'s deadline (a `DeadlineStore`) passed before
            COMMIT was begun: nothing was committed.
    """
    manifest = Manifest(attempt=attempt, process_count=process_count, created_at=created_at,
                        committed_at=time.time(), versions=versions(), metadata=metadata,
                        leaves=records, metrics=dict(metrics or {}), local=local,
                        parents=parents)
    data = encode_manifest(manifest)
    store.write(f"{attempt}/{MANIFEST}", data)
    log.debug("%s: manifest written", store.describe(attempt))
    claim_commit(store, attempt)
    record = CommitRecord(attempt=attempt, manifest_sha256=sha256(data),
                          committed_at=manifest.committed_at).encode()
    if isinstance(store, DeadlineStore):
        # What changes or checks COMMIT is never abandoned: a COMMIT write left running
        # could land after a later save and replace it. Once begun, these few requests run
        # to their end, each bounded by its own request deadline (docs/protocol.md).
        store.deadline.check(f"creating {store.describe(COMMIT)}")
        store = store.inner
    if overwrite:
        _replace(store, attempt, record)
        return
    try:
        won = store.write_if_absent(COMMIT, record)
    except StorageError as exc:
        # The create may have been applied with its answer lost: COMMIT tells. If it names
        # nobody, the request may still land, so the attempt stays claimed.
        holder = committed_attempt(store)
        if holder is None:
            raise CommitOutcomeUnknownError(
                f"creating {store.describe(COMMIT)} failed ({exc}) and it names no attempt "
                f"yet; the request may still land: whether attempt {attempt} committed, the "
                f"checkpoint's COMMIT decides (latest_step, restore)") from exc
        won = holder == attempt
    if won:
        _check_still_claimed(store, attempt)
        log.debug("%s: COMMIT created", store.describe(attempt))
        return
    retire(store, attempt)
    delete_data(store, attempt)
    raise CommitConflictError(
        f"{store.url} was committed by another attempt; attempt {attempt} lost")


def committed_attempt(store: Store) -> str | None:
    """The attempt the checkpoint's COMMIT names now, or None if it has no COMMIT.

    Raises:
        CorruptCheckpointError: COMMIT exists but cannot be read (then nothing of the
            checkpoint may be treated as debris).
    """
    try:
        raw = read_object(store, COMMIT, MAX_COMMIT_BYTES)
    except ObjectNotFoundError:
        return None
    return CommitRecord.decode(raw, store.describe(COMMIT)).attempt


def _check_still_claimed(store: Store, attempt: str) -> None:
    """After creating COMMIT: a claim that no longer says ``commit`` means a cleaner deleted
    this checkpoint while the create was in flight (an object store client retrying a create
    whose first try it did not see succeed); the COMMIT just made would name deleted data."""
    kind = claim_kind(store, attempt)
    if kind not in (None, REMOVING):
        return  # ours, or unreadable just now: nothing says it was removed
    if committed_attempt(store) == attempt:
        store.delete(COMMIT)
    raise AttemptRemovedError(
        f"{store.describe(attempt)} was removed (by a delete, rewind or `ckpt gc`) while its "
        f"COMMIT was being created; nothing was committed")


def _replace(store: Store, attempt: str, record: bytes) -> None:
    """Replaces COMMIT (overwrite): readers see the old checkpoint until then, the new one
    after; then the old attempt is deleted."""
    previous = committed_attempt(store)
    if previous is not None and previous != attempt:
        # Before COMMIT stops naming it, so that a crash here cannot leave it claimed for a
        # commit that will never come (which no cleaner would then remove).
        retire(store, previous)
    store.write(COMMIT, record)
    if previous is not None and previous != attempt:
        store.delete_prefix(previous)
        forget(store, previous)
    holder = committed_attempt(store)
    if holder is not None and holder != attempt:
        # Another overwrite replaced this one meanwhile (last write wins); it read the
        # same previous attempt, so nobody else retires this one.
        retire(store, attempt)
        delete_data(store, attempt)
