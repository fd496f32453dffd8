"""Writing one attempt folder of a checkpoint: the one owner of what goes into it, and when.

Two kinds of callers drive it, in this order (docs/protocol.md):

- the save path (`ckpt._save`): process 0 asks `refusal_if_committed` and draws
  `new_attempt_id`; every process opens its arrays (`open_arrays`, process 0 creating
  them), writes the chunks it owns through a `ChunkWriter` and its host report
  (`write_report`); after a barrier, process 0 alone calls `commit_attempt`;
- offline rewrites (`ckpt._reshard`: ``reshard``, ``convert``): one process does all of it,
  as process 0 of a job of one;
- a local-tier copy (`ckpt._local`): each process writes every chunk it holds into its own
  copy and commits it with `commit_copy`.

`commit_attempt` checks every host report against the plan (each chunk reported once, by its
planned writer, at its planned size; the processes' tree digests agree), copies each chunk's
crc32c into the records, then writes the manifest, claims the attempt and creates or
replaces COMMIT (`ckpt._commit`). Nothing else writes into an attempt folder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import google_crc32c
import numpy as np
import tensorstore as ts

from ckpt._agreement import check_agreement
from ckpt._commit import commit
from ckpt._format import (
    ARRAYS,
    ATTEMPT_PREFIX,
    CLAIMS,
    COMMIT,
    LINEAGE,
    REWIND,
    ZARR_JSON,
    HostReport,
    LeafKind,
    LeafRecord,
    array_key,
    chunk_object,
    decode_host_report,
    encode_host_report,
    host_report_key,
    plain_chunks,
    read_object,
    zarr_json,
    zarr_spec,
)
from ckpt._orbax import STEP_METADATA
from ckpt._reader import open_readable
from ckpt._tree import path_text
from ckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    SaveError,
    StorageError,
)
from ckpt.restore.boxes import chunk_key, grid_shape, unflat_index
from ckpt.storage import ChunkIO, Op, Store, Window

# A host-report row: leaf name, flat chunk index, bytes, crc32c of the stored bytes.
Row = tuple[str, int, int, int]

# Host reports process 0 reads at once: at thousands of processes the reads are latency
# bound, so they overlap.
REPORT_READERS = 32


def new_attempt_id() -> str:
    """A fresh, unique, sortable attempt id (process 0 of a save, or a rewrite)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{ATTEMPT_PREFIX}{stamp}-{secrets.token_hex(6)}"


def refusal_if_committed(store: Store, *, overwrite: bool,
                         how: str) -> CheckpointExistsError | None:
    """Why no attempt may be written at ``store``, else None. Checked by process 0 of a
    save, or by a rewrite, before an attempt id is drawn (one listing of the folder; more
    only when it holds something this library does not write there).

    - It holds a committed checkpoint of this library and ``overwrite`` was not asked
      (``how`` says how to ask).
    - It is a `CheckpointManager` root (step folders, its records): a checkpoint there would
      shadow the run (steps are saved with the manager), even with ``overwrite``.
    - It holds a checkpoint of another kind this library reads (Orbax's, safetensors), or
      the files of one it cannot read: a checkpoint written there would be read in its
      place, so it is never written, even with ``overwrite``.
    """
    names = store.list_children()
    if COMMIT in names:
        return None if overwrite else CheckpointExistsError(
            f"{store.url} already holds a committed checkpoint ({how} to replace it)")
    others = [n for n in names if not n.startswith((ATTEMPT_PREFIX, ".")) and n != CLAIMS]
    if not others:
        return None
    steps = sorted((n for n in others if n.isascii() and n.isdigit()), key=int)
    # A manager root: its records, or a numbered folder that is a committed step (the
    # newest few are asked: one existence check each).
    if LINEAGE in others or REWIND in others or any(
            store.exists(f"{n}/{COMMIT}") or store.exists(f"{n}/{STEP_METADATA}")
            for n in steps[-3:]):
        return CheckpointExistsError(
            f"{store.url} is the root of a CheckpointManager run (it holds "
            + (f"step folders {', '.join(steps[-3:])}" if steps else "its records")
            + "): save steps with CheckpointManager(root).save(step, ...), or give this "
            "checkpoint a folder of its own")
    if not any(n in _FOREIGN_MARKERS or n.endswith(_SAFETENSORS_SUFFIXES) for n in others):
        return None  # other files, no checkpoint: the checkpoint goes beside them
    try:
        found = open_readable(store)
    except CheckpointNotFoundError:
        return None
    except StorageError:
        raise  # could not look: no refusal to guess from that
    except CkptError as exc:
        return CheckpointExistsError(
            f"{store.url} holds the files of a checkpoint this library cannot read ({exc}): "
            "it never writes into such a folder; give this checkpoint a folder of its own")
    return CheckpointExistsError(
        f"{store.url} holds a checkpoint in {found.kind} format ({found.layout}): this "
        "library never writes into it, even with overwrite (the folder would then hold two "
        "checkpoints); give this one a folder of its own, or convert that one (ckpt convert)")


# Names whose presence makes a folder another kind of checkpoint this library reads: Orbax's
# metadata, commit marker and OCDBT manifest; safetensors files and indexes.
_FOREIGN_MARKERS = frozenset({STEP_METADATA, "_METADATA", "_sharding", "manifest.ocdbt",
                              "commit_success.txt"})
_SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")


@dataclasses.dataclass(frozen=True)
class PlainChunks:
    """An array whose chunks are written as plain objects (`ckpt._format.plain_chunks`):
    the attempt's ``arrays`` folder opened as one TensorStore kvstore, the array's folder
    in it and its chunk grid. No TensorStore array is opened for it."""

    kvstore: Any
    folder: str
    grid: tuple[int, ...]

    def write(self, flat: int, data: bytes) -> Any:
        """Starts writing chunk ``flat``'s stored object; its TensorStore future."""
        return self.kvstore.write(f"{self.folder}/{chunk_key(unflat_index(flat, self.grid))}",
                                  data)


def open_arrays(store: Store, attempt: str, records: dict[int, LeafRecord], *,
                create: bool) -> dict[int, Any]:
    """Opens the zarr arrays of ``records`` (index -> ``array`` record) in ``attempt`` for
    writing; ``create`` first writes every ``zarr.json`` through the store in one batch
    (`Store.write_many`: one request each on object stores, no read before it; one sync of
    a local file system for all of them). Process 0 creates; other processes write chunks
    into arrays they assume, so that no writer waits for another. Opening reads nothing.
    An array of small whole chunks (`plain_chunks`) is a `PlainChunks` on one kvstore of
    the attempt (what a TensorStore array costs to set up would outweigh its writes); every
    other array a TensorStore array. Waits through ``store.wait`` (a `DeadlineStore`
    bounds it)."""
    if create:
        store.write_many([(f"{array_key(attempt, rec.name)}/{ZARR_JSON}", zarr_json(rec))
                          for rec in records.values()])
    ctx = store.tensorstore_context()
    plain = {i for i, rec in records.items() if plain_chunks(rec)}
    opening = {i: ts.open(zarr_spec(store.kvstore_spec(array_key(attempt, rec.name),
                                                       sync_later=True), rec), context=ctx)
               for i, rec in records.items() if i not in plain}
    opened: dict[int, Any] = {}
    if plain:
        kvstore = store.wait(ts.KvStore.open(store.kvstore_spec(
            f"{attempt}/{ARRAYS}", sync_later=True), context=ctx),
            f"opening the arrays of {attempt}")
        for i in sorted(plain):
            rec = records[i]
            opened[i] = PlainChunks(kvstore, rec.name, grid_shape(rec.shape, rec.chunk_shape))
    for i, fut in opening.items():
        opened[i] = store.wait(fut, f"opening leaf {path_text(records[i].path)}")
    return opened


class ChunkWriter:
    """Writes chunks of arrays opened on ``store`` (`open_arrays`) through TensorStore, with
    at most ``limit`` bytes in flight, and keeps the host-report row of each. Each write is
    waited for through ``store.wait`` (a `DeadlineStore` bounds it; a wrapper store sees
    each chunk written); `finish` makes them all durable at once (`Store.sync`).

    Used by each process of a save on its background thread, and by offline rewrites.
    """

    def __init__(self, store: Store, limit: int) -> None:
        self.rows: list[Row] = []
        self._store = store
        # Bounded by the save's deadline when the store carries one (`DeadlineStore`).
        self._window = Window(limit, getattr(store, "deadline", None), "writing chunks")

    def put(self, array: Any, slices: tuple[slice, ...], data: np.ndarray, name: str,
            flat: int, durable: Callable[[], None] | None = None) -> None:
        """Starts writing one chunk; ``durable`` runs (on this thread) once it is."""
        def done(fut: Any) -> None:
            self._store.wait(fut, ChunkIO(Op.WRITE, name))
            if durable is not None:
                durable()

        plain = isinstance(array, PlainChunks)
        if not plain:
            self._window.add(array[slices].write(data), data.nbytes, done)
        # The crc32c of the chunk's C-order little-endian bytes (what the format stores),
        # computed while TensorStore writes them, or before a plain chunk is encoded.
        little = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        crc = google_crc32c.value(little.reshape(-1).view(np.uint8))
        if plain:  # ``data`` is the whole chunk (`plain_chunks`)
            self._window.add(array.write(flat, chunk_object(little, crc)), data.nbytes, done)
        self.rows.append((name, flat, data.nbytes, crc))

    def finish_oldest(self) -> bool:
        """Waits until the oldest chunk in flight is durable; False if none is in flight."""
        return self._window.finish_oldest()

    def finish(self) -> list[Row]:
        """Waits until every chunk is written, then makes them durable (`Store.sync`: the
        arrays were opened ``sync_later``, so a local file system syncs once, not once a
        chunk); returns the rows."""
        self._window.drain()
        self._store.sync()
        return self.rows

    def settle(self) -> None:
        """After an error: waits until no write is in flight any more (their outcomes
        dropped; past the store's deadline, what is left is cancelled), so that a failed
        save has stopped touching storage when it reports its failure."""
        self._window.settle()


def write_report(store: Store, attempt: str, process: int, rows: list[Row],
                 digests: tuple[str, dict[str, int]] = ("", {}),
                 per_process: Sequence[tuple[int, Any]] = ()) -> None:
    """Writes ``process``'s host report, once its chunks are durable (`ChunkWriter.finish`).
    ``digests``: the tree and value digests of `ckpt._agreement` (empty for one process);
    ``per_process``: this process's value of each per-process leaf, by leaf position."""
    tree, values = digests
    store.write(host_report_key(attempt, process), encode_host_report(
        attempt, HostReport(process, rows, tree, values, list(per_process))))


def check_reports(store: Store, attempt: str, records: list[LeafRecord],
                  process_count: int) -> list[LeafRecord]:
    """Every planned chunk reported once, by its planned writer, at its size. Returns the
    records with each chunk's reported crc32c in its layout, so that every restore checks
    each chunk it reads against the manifest. Called by `commit_attempt`.

    Raises:
        SaveError: naming the report and the chunk that disagree with the plan.
    """
    by_name = {rec.name: rec for rec in records if rec.kind == LeafKind.ARRAY}
    crcs = {name: list(rec.chunk_crc32c) for name, rec in by_name.items()}
    seen: set[tuple[str, int]] = set()
    keys = [host_report_key(attempt, p) for p in range(process_count)]
    with concurrent.futures.ThreadPoolExecutor(min(REPORT_READERS, len(keys))) as pool:
        raw = list(pool.map(functools.partial(read_object, store), keys))
    reports = [decode_host_report(data, store.describe(key))
               for key, data in zip(keys, raw, strict=True)]
    for p, (key, report) in enumerate(zip(keys, reports, strict=True)):
        if report.process != p:
            raise SaveError(f"{store.describe(key)} claims to be from process "
                            f"{report.process}")
    # Before the chunk rows: processes that saved different trees report different chunks.
    check_agreement(reports, records)
    for p, (key, report) in enumerate(zip(keys, reports, strict=True)):
        what = store.describe(key)
        for name, flat, nbytes, crc in report.chunks:
            rec = by_name.get(name)
            if rec is None or not 0 <= flat < len(rec.writers):
                raise SaveError(f"{what} reports unknown chunk {flat} of {name!r}")
            if rec.writers[flat] != p or (name, flat) in seen:
                raise SaveError(f"{what} reports chunk {flat} of {path_text(rec.path)}, which "
                                f"process {rec.writers[flat]} owns")
            if nbytes != rec.chunk_nbytes[flat]:
                raise SaveError(f"{what} reports {nbytes} bytes for chunk {flat} of "
                                f"{path_text(rec.path)}, expected {rec.chunk_nbytes[flat]}")
            seen.add((name, flat))
            crcs[name][flat] = crc
    for rec in by_name.values():
        for flat, writer in enumerate(rec.writers):
            if (rec.name, flat) not in seen:
                raise SaveError(f"chunk {flat} of leaf {path_text(rec.path)} was not reported by "
                                f"its writer, process {writer}")
    return [dataclasses.replace(rec, layout=rec.layout.with_crc32c(crcs[rec.name]))
            if rec.kind == LeafKind.ARRAY else rec for rec in _gather_per_process(
                records, reports, keys, store)]


def _gather_per_process(records: list[LeafRecord], reports: list[HostReport],
                        keys: list[str], store: Store) -> list[LeafRecord]:
    """The records with each ``per_process`` leaf a save left open (value None) holding
    every report's value of it, by process index (what the manifest stores). A rewrite's
    records already hold theirs."""
    owned = [dict(report.per_process) for report in reports]
    out = []
    for i, rec in enumerate(records):
        if rec.kind == LeafKind.PER_PROCESS and rec.value is None:
            lacking = [p for p, values in enumerate(owned) if i not in values]
            if lacking:
                raise SaveError(f"{store.describe(keys[lacking[0]])} holds no value for the "
                                f"per-process leaf {path_text(rec.path)}")
            rec = dataclasses.replace(rec, value=[values[i] for values in owned])
        out.append(rec)
    return out


def commit_attempt(store: Store, attempt: str, records: list[LeafRecord], *,
                   process_count: int, metadata: Any, created_at: float,
                   overwrite: bool = False, metrics: dict[str, float] | None = None,
                   parents: list[list[Any]] | None = None) -> None:
    """Process 0 (or a rewrite), once every process wrote its report: `check_reports`, then
    manifest, commit claim and COMMIT (`ckpt._commit.commit`, whose errors it raises)."""
    checked = check_reports(store, attempt, records, process_count)
    commit(store, attempt=attempt, records=checked, metadata=metadata, created_at=created_at,
           process_count=process_count, overwrite=overwrite, metrics=metrics,
           parents=parents)


def commit_copy(store: Store, attempt: str, records: list[LeafRecord], rows: list[Row], *,
                process_count: int, metadata: Any, created_at: float, metrics: dict[str, float],
                local: dict[str, Any], parents: list[list[Any]] | None = None) -> None:
    """One process's own copy of a step (the local tier: `ckpt._local.LocalTierCopy`),
    every chunk of which it wrote itself: each chunk's crc32c from ``rows`` into the
    records, then manifest, commit claim and COMMIT created if absent (`ckpt._commit.commit`,
    whose errors it raises). ``local`` is the manifest's ``local`` record."""
    crcs = {(name, flat): crc for name, flat, _, crc in rows}
    checked = [dataclasses.replace(rec, layout=rec.layout.with_crc32c(
        [crcs.get((rec.name, f), 0) for f in range(len(rec.writers))]))
        if rec.kind == LeafKind.ARRAY else rec for rec in records]
    commit(store, attempt=attempt, records=checked, metadata=metadata, created_at=created_at,
           process_count=process_count, metrics=metrics, local=local, parents=parents)
