"""Every process of a save saves the same tree: same structure, same non-jax values.

A ``jax.Array`` is one global value whose shards live on many processes; a numpy array or a
Python value is a separate object on each process, and the save writes each of its chunks
from one process only. If the processes disagree (a leaf only one process has, a data
loader position that differs per host), the checkpoint would silently hold a mix. So each
process digests its tree while the save takes its snapshot, puts the digests in its host
report, and process 0 compares them before it writes the manifest (docs/protocol.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import google_crc32c
import numpy as np

from ckpt._format import HostReport, LeafKind, LeafRecord, pack
from ckpt._tree import path_text, python_path
from ckpt.errors import SaveError


def digests(records: Sequence[LeafRecord], leaves: Sequence[Any]) -> tuple[str, dict[str, int]]:
    """This process's tree digest and the crc32c of each numpy leaf and Python value, by key
    path. Called by every process of a multi-process save, in the caller's thread (the
    values are the caller's objects, which it may change once `save_async` returns)."""
    shape = pack([[list(map(list, r.path)), r.kind, r.source, r.dtype, list(r.shape), r.vtype,
                   r.compression] for r in records])
    values: dict[str, int] = {}
    for rec, leaf in zip(records, leaves, strict=True):
        if rec.kind == LeafKind.VALUE:
            values[python_path(rec.path)] = google_crc32c.value(pack(rec.value))
        elif rec.kind in (LeafKind.ARRAY, LeafKind.INLINE) and \
                rec.source in ("numpy", "numpy_scalar"):
            # (Per-process leaves differ by design; None and empty containers hold nothing.)
            array = np.asarray(leaf)
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            values[python_path(rec.path)] = google_crc32c.value(little.reshape(-1).view(np.uint8))
    return hashlib.sha256(shape).hexdigest(), values


def check_agreement(reports: Sequence[HostReport], records: Sequence[LeafRecord]) -> None:
    """Process 0, before the manifest: every report's digests equal process 0's.
    ``records`` (process 0's leaves) give the messages each leaf's `path_text`.

    Raises:
        SaveError: naming the first leaf that differs and the processes that differ, or,
            where no leaf can be named, the processes whose tree structure differs.
    """
    if len(reports) < 2:
        return
    mine = reports[0]
    shown = {python_path(rec.path): path_text(rec.path) for rec in records}
    for key in sorted(set().union(*(r.values for r in reports))):
        leaf = shown.get(key, key)
        if key not in mine.values:
            holders = [r.process for r in reports if key in r.values]
            raise SaveError(f"leaf {leaf} is saved by processes {holders} but not by "
                            "process 0: every process must save the same tree")
        differ = [r.process for r in reports if r.values.get(key) != mine.values[key]]
        if differ:
            raise SaveError(
                f"leaf {leaf} holds different values on processes {differ} than on process 0: "
                "numpy arrays and Python values must be equal on every process (a jax.Array "
                "is the way to save data that differs per process)")
    differ = [r.process for r in reports if r.tree != mine.tree]
    if differ:
        raise SaveError(f"processes {differ} save a tree whose structure (leaf paths, kinds, "
                        "dtypes, shapes or compression) differs from process 0's: every "
                        "process must save the same tree with the same options")
