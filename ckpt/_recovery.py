"""Rebuilding a lost process's local copy from the replica a peer holds (docs/tiers.md,
"Peer replicas").

A process whose folder lacks the copy of a step that every other process holds (a replaced
host, a lost disk) gets it back at start-up, before anything is offered: the process holding
its replica (`ckpt._peers.holders`, recorded in each copy's ``local.replicas_of``) sends the
objects of its own copy that the lost process needs (each array's ``zarr.json`` and the
chunks whose writer is either of them), over JAX's collectives (`ckpt._peers.exchange`), and
the lost process writes them into its folder under the same attempt id and commits its
copy (manifest, claim, COMMIT: `ckpt._commit.commit`). The step is then complete by the
ordinary rule, and the start-up exchange of copies runs again.

Called by `ckpt._tiers.LocalTier` on every process (the exchange is collective), in order:
`plan` on process 0, then `rebuild` everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckpt import _coord
from ckpt._commit import commit
from ckpt._format import (
    COMMIT,
    MANIFEST,
    LeafKind,
    Manifest,
    decode_manifest,
    pack,
    unpack,
)
from ckpt._peers import Concatenation, Division, Transfer, exchange
from ckpt._reader import open_checkpoint
from ckpt.errors import CkptError, CorruptCheckpointError
from ckpt.restore.boxes import flat_index, grid_shape
from ckpt.storage import Store, check_key

log = logging.getLogger("ckpt.local")


def plan(found: dict[int, Any], count: int, keep: int) -> dict[str, dict[str, Any]]:
    """Process 0, from every process's start-up report (`ckpt._tiers.LocalTier`: each
    copy as ``[step, attempt, process, process_count, parents, replicas_of]``): for the
    newest ``keep`` steps that some processes lack and that can be rebuilt, ``{step:
    {"attempt": the save, "senders": {lost process: the process sending its copy}}}`` (JSON
    keys). A step can be rebuilt when every
    copy there is of one save, written by the process of its index in a job of this size,
    and each lost process's replica is held by a process that has its copy."""
    by_step: dict[int, dict[int, list[Any]]] = {}
    for p, value in found.items():
        for entry in value["copies"]:
            by_step.setdefault(int(entry[0]), {})[p] = entry
    out: dict[str, dict[str, Any]] = {}
    for step in sorted(by_step, reverse=True):
        held = by_step[step]
        lost = sorted(set(range(count)) - set(held))
        if not lost or len(out) == keep:
            continue
        if len({e[1] for e in held.values()}) != 1 or any(
                e[2] != p or e[3] != count for p, e in held.items()):
            continue
        senders = {m: min((p for p, e in held.items() if m in (e[5] or [])), default=None)
                   for m in lost}
        if all(h is not None for h in senders.values()):
            out[str(step)] = {"attempt": next(iter(held.values()))[1], "senders": {
                str(m): int(h) for m, h in senders.items() if h is not None}}
        else:
            log.warning("step %d: processes %s hold no local copy of it and no other process "
                        "holds their replica; it is not restorable from the local tier",
                        step, [m for m, h in senders.items() if h is None])
    return out


@dataclasses.dataclass
class _Outgoing:
    """What this process sends one lost process: a header (its manifest's bytes and the
    objects' keys and sizes), then the objects themselves, in that order."""

    header: bytes
    objects: list[tuple[str, int]]


def rebuild(store: Store, step: int, attempt: str, senders: dict[int, int], key: str,
            timeout_s: float) -> None:
    """Every process, at start-up: rebuilds the copies of ``step`` (the save ``attempt``)
    that ``senders`` (lost process -> the process sending its copy) names. ``store`` is
    this process's local folder. Raises on every process if it failed anywhere (naming the
    process); the lost processes' folders then hold debris that the next start-up either
    rebuilds over (an interrupted rebuild's: `REBUILT` marks it) or cleans up.

    Raises:
        CkptError: reading the sender's copy, the transfer, or the writes failed.
    """
    coord = _coord.current()
    me = coord.process_index
    folder = store.child(str(step))
    outgoing: dict[int, _Outgoing] = {}
    mine: Any
    try:
        for lost in (m for m, h in senders.items() if h == me):
            outgoing[lost] = _outgoing(folder, lost, attempt)
        if me in senders:
            _check_empty(folder, attempt)
            folder.write(f"{attempt}/{REBUILT}", pack({"sender": senders[me]}))
        mine = {str(m): [len(o.header), sum(n for _, n in o.objects)]
                for m, o in outgoing.items()}
    except CkptError as exc:
        mine = exc
    sizes = coord.gather_all(f"{key}/sizes", mine, timeout_s,
                             f"rebuilding step {step} from peers: ")
    headers = [Transfer(h, int(m), sizes[h][m][0]) for h in sorted(sizes)
               for m in sorted(sizes[h], key=int)]
    bodies = [Transfer(h, int(m), sizes[h][m][1]) for h in sorted(sizes)
              for m in sorted(sizes[h], key=int)]
    # From here on every process runs both exchanges whatever fails on it (the others
    # wait inside each collective); a failure is told at the end, in "done".
    failure: BaseException | None = None
    received = bytearray()
    try:
        exchange(headers, lambda t, at, n: outgoing[t.dst].header[at:at + n],
                 lambda t, at, data: received.extend(data.tobytes()))
    except Exception as exc:
        failure = exc
    manifest: Manifest | None = None
    objects: list[tuple[str, int]] = []
    if me in senders and failure is None:
        try:
            manifest, objects = _parse(bytes(received), step, senders[me], attempt)
        except Exception as exc:
            failure = exc
    writer = _Writer(folder, objects if failure is None else [])
    try:
        exchange(bodies, _reader(folder, outgoing), writer)
    except Exception as exc:
        failure = failure or exc
    if me in senders and failure is None:
        try:
            writer.check()
            assert manifest is not None
            _commit_rebuilt(folder, manifest, me)
        except Exception as exc:
            failure = exc
    if failure is not None and not isinstance(failure, CkptError):
        error = CorruptCheckpointError(f"rebuilding step {step} on process {me} failed: "
                                       f"{type(failure).__name__}: {failure}")
        error.__cause__ = failure
        failure = error
    coord.gather_all(f"{key}/done", failure if failure is not None else True, timeout_s,
                     f"rebuilding step {step} from peers: ")
    if me in senders:
        log.info("local tier %s: rebuilt step %d from process %d's replica (%.1f MiB)",
                 store.url, step, senders[me], writer.written / 2**20)


# Written first into the attempt folder of a copy being rebuilt: what a later start-up
# finds there is then an interrupted rebuild's, which it may write over.
REBUILT = "REBUILT"


def _check_empty(folder: Store, attempt: str) -> None:
    """Refuses to rebuild over anything but an interrupted rebuild of the same save: a
    COMMIT this process could not read, or part of an earlier save of the step (a process
    of the earlier run may still be writing it, and would then commit or remove it under
    the rebuilt copy).

    Raises:
        CorruptCheckpointError: naming the folder and what is there.
    """
    if folder.exists(COMMIT):
        raise CorruptCheckpointError(
            f"{folder.url} holds a COMMIT this process cannot read: not rebuilt over it")
    held = folder.list(attempt) + ([f"claims/{attempt}"]
                                   if folder.exists(f"claims/{attempt}") else [])
    if held and not folder.exists(f"{attempt}/{REBUILT}"):
        raise CorruptCheckpointError(
            f"{folder.url} holds part of an earlier save of this step ({len(held)} objects "
            f"of {attempt}): a process of that run may still be writing it; not rebuilt")


def _outgoing(folder: Store, lost: int, attempt: str) -> _Outgoing:
    """The objects of this process's copy that process ``lost`` needs: each array's
    ``zarr.json`` and every chunk the copy holds. (Every chunk ``lost``'s devices held is
    among them, whichever process a chunk is recorded under: a chunk several processes
    held is recorded once.)"""
    _, manifest = open_checkpoint(folder)
    if manifest.attempt != attempt or lost not in (manifest.local or {}).get(
            "replicas_of", []):
        raise CorruptCheckpointError(
            f"{folder.url} holds no replica of process {lost} from {attempt}")
    arrays = f"{manifest.attempt}/arrays/"
    grids = {r.name: (r.writers, grid_shape(r.shape, r.chunk_shape))
             for r in manifest.leaves if r.kind == LeafKind.ARRAY}
    wanted: list[tuple[str, int]] = []
    # One pass over the listing: a leaf's folder name is one path segment (`leaf_name`).
    for k, n in folder.list_sizes(arrays.rstrip("/")).items():
        name, _, rest = k[len(arrays):].partition("/")
        if name in grids and (rest == "zarr.json" or (
                rest.startswith("c/") and _chunk_writer(*grids[name], rest[2:]) >= 0)):
            wanted.append((k, n))
    data = folder.read(f"{manifest.attempt}/{MANIFEST}")
    return _Outgoing(pack({"manifest": data, "objects": [list(o) for o in sorted(wanted)]}),
                     sorted(wanted))


def _chunk_writer(writers: Sequence[int], grid: tuple[int, ...], coords: str) -> int:
    """The writer the manifest records for the chunk at ``coords`` (its key's ``c/...``
    part); -1 for a key that names no chunk of the grid."""
    parts = coords.split("/")
    if len(parts) != len(grid) or not all(p.isdigit() for p in parts):
        return -1
    coord = tuple(int(p) for p in parts)
    if any(c >= g for c, g in zip(coord, grid, strict=True)):
        return -1
    return writers[flat_index(coord, grid)]


def _parse(header: bytes, step: int, sender: int,
           attempt: str) -> tuple[Manifest, list[tuple[str, int]]]:
    """The lost process's side: the sender's manifest (of the planned save and step) and
    the objects to expect, every key checked to stay inside the attempt's arrays folder."""
    what = f"the copy of step {step} process {sender} sent"
    doc = unpack(header, what)
    if not isinstance(doc, dict) or not isinstance(doc.get("manifest"), bytes) \
            or not isinstance(doc.get("objects"), list):
        raise CorruptCheckpointError(f"{what} is malformed")
    manifest = decode_manifest(doc["manifest"], what)
    if manifest.attempt != attempt or manifest.local is None \
            or manifest.local["step"] != step:
        raise CorruptCheckpointError(f"{what} is not of step {step}'s save {attempt}")
    objects = []
    for entry in doc["objects"]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and type(entry[1]) is int and entry[1] >= 0):
            raise CorruptCheckpointError(f"{what} lists a malformed object")
        key = check_key(entry[0])
        if not key.startswith(f"{manifest.attempt}/arrays/"):
            raise CorruptCheckpointError(f"{what} names an object outside its arrays: {key}")
        objects.append((key, entry[1]))
    return manifest, objects


def _reader(folder: Store, outgoing: dict[int, _Outgoing]) -> Any:
    """The sending side of the objects: each read whole from this process's copy when the
    exchange reaches it (one object in memory at a time per lost process)."""
    def load(objects: list[tuple[str, int]], i: int) -> bytes:
        key, n = objects[i]
        data = folder.read(key, max_bytes=n)
        if len(data) != n:
            raise CorruptCheckpointError(f"{folder.describe(key)} changed size while it "
                                         "was sent")
        return data

    streams = {m: Concatenation([n for _, n in o.objects],
                                functools.partial(load, o.objects))
               for m, o in outgoing.items()}
    return lambda t, at, length: streams[t.dst].read(at, length)


class _Writer:
    """The lost process's side of the objects: each written to its folder once whole."""

    def __init__(self, folder: Store, objects: list[tuple[str, int]]) -> None:
        self.folder, self.objects, self.written = folder, objects, 0
        self.parts = Division([n for _, n in objects], self._write)

    def _write(self, i: int, data: np.ndarray) -> None:
        self.folder.write(self.objects[i][0], data.tobytes())
        self.written += data.size

    def __call__(self, t: Transfer, at: int, data: np.ndarray) -> None:
        self.parts.take(data)

    def check(self) -> None:
        missing = self.parts.missing()
        if missing:
            raise CorruptCheckpointError(
                f"{self.folder.url}: {missing} objects of the rebuilt copy never arrived")


def _commit_rebuilt(folder: Store, sent: Manifest, me: int) -> None:
    """Commits the rebuilt copy: the sender's manifest (every chunk it holds was sent,
    with the per-process values it holds), with this process as its writer and every
    other process a chunk is recorded under in ``replicas_of``; its chunks are read back
    and checked by every restore, as any copy's."""
    assert sent.local is not None
    local = {k: v for k, v in sent.local.items() if k != "replicas_of"}
    local["process"] = me
    others = sorted({w for r in sent.leaves if r.kind == LeafKind.ARRAY
                     for w in r.writers if w >= 0} - {me})
    if others:
        local["replicas_of"] = others
    commit(folder, attempt=sent.attempt, records=sent.leaves, metadata=sent.metadata,
           created_at=sent.created_at, process_count=sent.process_count,
           metrics=sent.metrics, local=local, parents=sent.parents)
