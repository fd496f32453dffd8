"""The last step of every write: manifest, commit claim, then COMMIT (created if absent, or
replaced).

Called on process 0 only: by the save path once every process has reported its chunks, and
by offline rewrites (`ckpt reshard`). See docs/protocol.md.
"""

from __future__ import annotations

import functools
import time
from importlib import metadata as dist_metadata
from typing import Any

from ckpt._format import (
    COMMIT,
    MANIFEST,
    CommitRecord,
    LeafRecord,
    Manifest,
    encode_manifest,
    sha256,
)
from ckpt._claims import claim_commit, delete_data, forget, retire
from ckpt.errors import CommitConflictError
from storage import ObjectNotFoundError, Store


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
           metrics: dict[str, float] | None = None) -> None:
    """Writes ``<attempt>/manifest.msgpack``, claims the attempt, then makes it the checkpoint.

    Without ``overwrite``, COMMIT is created only if absent: of concurrent attempts exactly
    one wins; a loser retires its own attempt (deletes it) and gets `CommitConflictError`.
    With ``overwrite``, COMMIT is replaced atomically (readers see the old checkpoint until
    then, the new one after), then the old attempt is deleted.

    Raises:
        AttemptRemovedError: a cleaner claimed ``attempt`` first (see `ckpt._claims`).
        CommitConflictError: another attempt holds COMMIT (without ``overwrite``).
    """
    manifest = Manifest(attempt=attempt, process_count=process_count, created_at=created_at,
                        committed_at=time.time(), versions=versions(), metadata=metadata,
                        leaves=records, metrics=dict(metrics or {}))
    data = encode_manifest(manifest)
    store.write(f"{attempt}/{MANIFEST}", data)
    claim_commit(store, attempt)
    record = CommitRecord(attempt=attempt, manifest_sha256=sha256(data),
                          committed_at=manifest.committed_at).encode()
    if not overwrite:
        if not store.write_if_absent(COMMIT, record):
            retire(store, attempt)
            delete_data(store, attempt)
            raise CommitConflictError(
                f"{store.url} was committed by another attempt; attempt {attempt} lost")
        return
    previous = None
    try:
        previous = CommitRecord.decode(store.read(COMMIT), store.describe(COMMIT)).attempt
    except ObjectNotFoundError:
        pass
    if previous is not None and previous != attempt:
        # Before COMMIT stops naming it, so that a crash here cannot leave it claimed for a
        # commit that will never come (which no cleaner would then remove).
        retire(store, previous)
    store.write(COMMIT, record)
    if previous is not None and previous != attempt:
        store.delete_prefix(previous)
        forget(store, previous)
