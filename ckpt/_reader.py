"""Reading a committed checkpoint: the one owner of how its bytes are found and checked.

`open_readable` opens what is at a URL as a `Readable`: one of this library's checkpoints
(`open_checkpoint`: COMMIT, then the manifest it names, whose sha256 is checked before
anything else is trusted; arrays at their keys in the attempt folder; every chunk checked
against the manifest's crc32c and its own stored tail), else an orbax-checkpoint one
(`ckpt._orbax`: its metadata as the same leaf records, arrays where Orbax put them, no
checksums to check), else safetensors (`ckpt._safetensors`: a file or a Hugging Face
folder, each tensor an array record read by byte ranges). Restore, `ckpt.metadata`, verify,
reshard and convert read through this interface and never ask which format it is.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Collection, Sequence
from typing import Any

from ckpt._codecs import min_stored_bytes
from ckpt._format import (
    ATTEMPT_PREFIX,
    COMMIT,
    MANIFEST,
    MAX_COMMIT_BYTES,
    ZARR_JSON,
    CommitRecord,
    LeafKind,
    LeafRecord,
    Manifest,
    array_key,
    array_read_spec,
    decode_manifest,
    plain_chunks,
    read_object,
    sha256,
)
from ckpt._leaves import dtype_from_name
from ckpt._names import NameRules
from ckpt._orbax import OrbaxItem
from ckpt._orbax_items import open_orbax
from ckpt._safetensors import SafetensorsFiles, bind, open_safetensors
from ckpt._tree import KeyPath, path_text
from ckpt.errors import (
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    InvalidArgumentError,
    NotACheckpointError,
    UncommittedCheckpointError,
)
from ckpt.restore import ArrayReadJob, RawLayout
from ckpt.restore.boxes import Box, chunk_key, grid_shape, unflat_index
from ckpt.storage import ObjectNotFoundError, Store, UnreadableObjectError

log = logging.getLogger("ckpt.restore")


def open_checkpoint(store: Store) -> tuple[CommitRecord, Manifest]:
    """Reads COMMIT and the manifest it names, checking the manifest's digest.

    Called on any process, before any array byte is read.

    Raises:
        CheckpointNotFoundError: nothing at the URL.
        UncommittedCheckpointError: attempts but no COMMIT.
        NotACheckpointError: something else is there.
        CorruptCheckpointError: COMMIT or manifest unreadable, or the digest differs.
    """
    try:
        data = read_object(store, COMMIT, MAX_COMMIT_BYTES)
    except ObjectNotFoundError:
        children = store.list_children()
        if not children:
            raise CheckpointNotFoundError(
                f"no checkpoint at {store.url}: nothing is there") from None
        if any(c.startswith(ATTEMPT_PREFIX) for c in children):
            raise UncommittedCheckpointError(
                f"{store.url} holds an uncommitted checkpoint (a save that was interrupted or "
                "is still running): no COMMIT") from None
        shown = ", ".join(children[:5]) + (", ..." if len(children) > 5 else "")
        raise NotACheckpointError(
            f"{store.url} is not a checkpoint (no COMMIT; it holds {shown})") from None
    commit = CommitRecord.decode(data, store.describe(COMMIT))
    key = f"{commit.attempt}/{MANIFEST}"
    try:
        manifest_bytes = read_object(store, key)
    except ObjectNotFoundError:
        if not store.exists(COMMIT):  # removed between the two reads (COMMIT goes first)
            raise CheckpointNotFoundError(
                f"{store.url} was removed while it was opened (a delete, the run's "
                "retention or a rewind)") from None
        raise CorruptCheckpointError(
            f"{store.describe(COMMIT)} names a manifest that is missing: "
            f"{store.describe(key)}") from None
    if sha256(manifest_bytes) != commit.manifest_sha256:
        raise CorruptCheckpointError(
            f"{store.describe(key)} does not match the sha256 recorded in "
            f"{store.describe(COMMIT)}: the manifest was modified or damaged")
    manifest = decode_manifest(manifest_bytes, store.describe(key))
    if manifest.attempt != commit.attempt:
        raise CorruptCheckpointError(f"{store.describe(key)} belongs to attempt "
                                     f"{manifest.attempt!r}, not {commit.attempt!r}")
    return commit, manifest


class Readable(abc.ABC):
    """A committed checkpoint opened for reading.

    Attributes:
        store: where it is.
        manifest: its leaves (for a format without checksums, records with none).
        layout: ``ckpt format 1``, or ``orbax-checkpoint (OCDBT, zarr v2)`` and the like.
        item: the item opened (``item=``), None for the whole checkpoint.
        kind: the format's name in messages (``ckpt``, ``Orbax``).
        checksummed: whether every chunk carries checksums a reader checks (what
            ``ckpt verify`` needs).
    """

    kind: str
    checksummed: bool

    def __init__(self, store: Store, manifest: Manifest, layout: str,
                 item: str | None = None) -> None:
        self.store, self.manifest, self.layout, self.item = store, manifest, layout, item

    @abc.abstractmethod
    def array_spec(self, rec: LeafRecord) -> dict[str, Any]:
        """The TensorStore spec that opens array leaf ``rec`` for reading."""

    @abc.abstractmethod
    def context(self) -> Any:
        """The TensorStore context to open arrays in."""

    @abc.abstractmethod
    def _chunks_end_with_crc32c(self) -> bool:
        """Whether each stored chunk ends with its own crc32c (docs/format.md)."""

    def read_job(self, rec: LeafRecord, boxes: Sequence[Box]) -> ArrayReadJob:
        """What `ckpt.restore.read_arrays` needs to read ``boxes`` of array leaf ``rec``,
        with every check this format allows on each chunk it reads."""
        return self._job(rec, boxes, self.array_spec(rec))

    def _job(self, rec: LeafRecord, boxes: Sequence[Box], spec: dict[str, Any]) -> ArrayReadJob:
        what = f"{self.store.url} leaf {path_text(rec.path)}"
        return ArrayReadJob(path_text(rec.path), spec, self.context(), rec.shape,
                            rec.chunk_shape, dtype_from_name(rec.dtype, what), list(boxes),
                            list(rec.chunk_crc32c) or None,
                            crc32c_in_chunk_tail=(self._chunks_end_with_crc32c()
                                                  and not rec.compression),
                            store=self.store)

    def read_jobs(self, rec: LeafRecord, boxes: Sequence[Box]) -> list[ArrayReadJob]:
        """The reads of ``boxes`` of ``rec``: one `read_job`, except where a checkpoint's
        boxes come from several places (`ckpt._tiers.Tiered`). Called by restore."""
        return [self.read_job(rec, boxes)]

    def check_files(self, records: Sequence[LeafRecord]) -> None:
        """Called by restore, on any process, before `read_job` for many ``records``: a
        format may check what its arrays' reads will open all at once. Nothing by default."""
        return None

    def replacement(self) -> Readable | None:
        """After a read found damage: the checkpoint that replaced this one meanwhile (an
        overwrite commits a new attempt, then deletes the old one), or None when it was not
        replaced, so that the damage is real."""
        return None

    def removed(self) -> bool:
        """After a read found damage that no `replacement` explains: whether the checkpoint
        is gone meanwhile (a delete, retention or rewind removes COMMIT first), so that the
        damage was its removal under the reader."""
        return False

    def for_target(self, pairs: Sequence[tuple[KeyPath, Any]] | None,
                   names: NameRules | None) -> Readable:
        """Called by restore before matching, with a target's (key path, leaf) pairs (None
        without a target): a format whose leaves are found by name (safetensors) returns
        itself with a leaf record at each target path; a checkpoint with a tree of its own
        is matched by path and returns itself. ``names``: the name rules a restore was
        given, for formats that name leaves."""
        if names is not None:
            raise InvalidArgumentError(
                f"{self.store.url} is a {self.kind} checkpoint: name rules "
                "(names=) apply to safetensors only")
        return self


# Arrays of at most this many chunks have each file checked by name instead of a listing.
_STAT_CHUNKS = 4
# Arrays of at least this many bytes have their chunk objects' sizes checked against the
# manifest before a restore allocates them (one listing each: small beside reading them).
BACKED_BYTES = 64 << 20


class _Ours(Readable):
    """One of this library's checkpoints."""

    kind, checksummed = "ckpt", True

    def __init__(self, store: Store, manifest: Manifest, layout: str,
                 item: str | None = None) -> None:
        super().__init__(store, manifest, layout, item)
        self._checked: set[str] = set()  # arrays whose files `check_files` found plain

    @staticmethod
    def _file_keys(rec: LeafRecord) -> list[str] | None:
        """The files TensorStore may open in an array's folder, for an array of few
        chunks (each is looked at: a stat); None for a larger one (its folder is listed)."""
        if len(rec.chunk_nbytes) > _STAT_CHUNKS:
            return None
        grid = grid_shape(rec.shape, rec.chunk_shape)
        return [ZARR_JSON] + [chunk_key(unflat_index(f, grid))
                              for f in range(len(rec.chunk_nbytes))]

    @staticmethod
    def _read_plain(rec: LeafRecord) -> bool:
        """Whether restore reads ``rec`` as a plain object (`read_job`)."""
        return len(rec.chunk_nbytes) == 1 and bool(rec.chunk_crc32c) and plain_chunks(rec)

    def read_job(self, rec: LeafRecord, boxes: Sequence[Box]) -> ArrayReadJob:
        """An array of one small whole chunk (`plain_chunks`) is read as a plain object
        (`ArrayReadJob.plain_key`): the read itself refuses what is not a regular file, so
        nothing is looked at first, and neither TensorStore nor its ``zarr.json`` is asked
        (the manifest alone says how to decode it; ``ckpt verify`` checks ``zarr.json``)."""
        prefix = array_key(self.manifest.attempt, rec.name)
        if not self._read_plain(rec):
            job = super().read_job(rec, boxes)
            if job.crc32c_in_chunk_tail and job.crc32c:  # chunks are `chunk_object`s
                job.chunk_prefix = prefix
            return job
        job = self._job(rec, boxes, {})  # no spec: `array_spec` would look at the files
        job.plain_key = f"{prefix}/{chunk_key((0,) * len(rec.shape))}"
        return job

    def check_files(self, records: Sequence[LeafRecord]) -> None:
        """Checks the files of every array of few chunks among ``records`` at once (the
        store may look at them concurrently: on a cold cache each look is a disk read);
        arrays read as plain objects need no look (`read_job`)."""
        few = [r for r in records if r.kind == LeafKind.ARRAY and r.name not in self._checked
               and self._file_keys(r) is not None and not self._read_plain(r)]
        keys = [f"{r.name}/{k}" for r in few for k in self._file_keys(r) or ()]
        for rec in records:
            if rec.kind == LeafKind.ARRAY and rec.nbytes >= BACKED_BYTES:
                self._check_backed(rec)
        try:
            self.store.check_plain_files(array_key(self.manifest.attempt, "").rstrip("/"),
                                         keys)
        except UnreadableObjectError:
            return  # `array_spec` checks each again and names the leaf
        self._checked.update(r.name for r in few)

    def _check_backed(self, rec: LeafRecord) -> None:
        """Raises `CorruptCheckpointError` unless every chunk of a large array is stored
        with the size its manifest records: a manifest whose checksum holds may still
        declare a shape its stored bytes do not back (an edited one, re-signed), and
        restore must not allocate that before any chunk read could fail."""
        folder = array_key(self.manifest.attempt, rec.name)
        sizes = self.store.list_sizes(f"{folder}/c")
        grid = grid_shape(rec.shape, rec.chunk_shape)
        for flat, nbytes in enumerate(rec.chunk_nbytes):
            key = f"{folder}/{chunk_key(unflat_index(flat, grid))}"
            stored = sizes.get(key)
            least = min_stored_bytes(rec.compression, nbytes)
            if stored is None or stored < least or (stored != least and not rec.compression):
                records = (f"{nbytes} (+4 for its checksum)" if not rec.compression else
                           f"{nbytes}, which {rec.compression} stores in at least {least}")
                raise CorruptCheckpointError(
                    f"leaf {path_text(rec.path)}: chunk {unflat_index(flat, grid)} "
                    + ("is missing" if stored is None else f"holds {stored} bytes")
                    + f" ({self.store.describe(key)}); the manifest records {records}, "
                    f"{rec.nbytes} for the array: nothing is read")

    def array_spec(self, rec: LeafRecord) -> dict[str, Any]:
        """Checks first that the files TensorStore may open in the array's folder are
        regular files: it would block forever on a FIFO."""
        folder = array_key(self.manifest.attempt, rec.name)
        if rec.name not in self._checked:
            try:
                self.store.check_plain_files(folder, self._file_keys(rec))
            except UnreadableObjectError as exc:
                raise CorruptCheckpointError(f"leaf {path_text(rec.path)}: {exc}") from None
        if self.item is not None:  # stored under its whole path, which its metadata names
            rec = dataclasses.replace(rec, path=(("key", self.item),) + rec.path)
        return array_read_spec(self.store.kvstore_spec(folder), rec)

    def context(self) -> Any:
        return self.store.tensorstore_context()

    def _chunks_end_with_crc32c(self) -> bool:
        return True

    def replacement(self) -> Readable | None:
        try:
            again = open_readable(self.store, self.item)
        except CkptError:
            return None
        return None if again.manifest.attempt == self.manifest.attempt else again

    def removed(self) -> bool:
        try:
            return not self.store.exists(COMMIT)
        except CkptError:
            return False  # cannot tell: the damage stands


class _Orbax(Readable):
    """An orbax-checkpoint item (`ckpt._orbax`)."""

    kind, checksummed = "Orbax", False

    def __init__(self, item: OrbaxItem) -> None:
        super().__init__(item.store, item.manifest, f"orbax-checkpoint ({item.layout})")
        self._item = item

    def array_spec(self, rec: LeafRecord) -> dict[str, Any]:
        return self._item.specs[rec.path]

    def context(self) -> Any:
        return self._item.context

    def _chunks_end_with_crc32c(self) -> bool:
        return False


class _SafeTensors(Readable):
    """Safetensors files (`ckpt._safetensors`): each tensor read by byte ranges."""

    kind, checksummed = "safetensors", False

    def __init__(self, files: SafetensorsFiles) -> None:
        super().__init__(files.store, files.manifest, files.layout)
        self._files = files

    def array_spec(self, rec: LeafRecord) -> dict[str, Any]:
        return {"kvstore": self.store.kvstore_spec()}

    def context(self) -> Any:
        return self.store.tensorstore_context()

    def _chunks_end_with_crc32c(self) -> bool:
        return False

    def read_job(self, rec: LeafRecord, boxes: Sequence[Box]) -> ArrayReadJob:
        t = self._files.tensors[rec.name]
        job = super().read_job(rec, boxes)
        job.raw = RawLayout(t.file, t.begin, t.generation)
        job.name = f"{path_text(rec.path)} (tensor {t.name!r} of {t.file})"
        return job

    def for_target(self, pairs: Sequence[tuple[KeyPath, Any]] | None,
                   names: NameRules | None) -> Readable:
        bound = _SafeTensors(self._files)
        if pairs is not None:
            bound.manifest = bind(self._files, pairs, names or NameRules())
        elif names is not None:  # without a target, names are kept as stored: drops only
            bound.manifest = dataclasses.replace(self.manifest, leaves=[
                r for r in self.manifest.leaves if not names.ignores(r.name)])
        return bound


def open_readable(store: Store, item: str | None = None,
                  wanted: Collection[str] | None = None) -> Readable:
    """Opens the checkpoint at ``store``: this library's, else an Orbax one.

    Called on any process by restore, `ckpt.metadata` and the offline tools. Orbax files
    are only looked for when there is no COMMIT, so reading this library's checkpoints costs
    nothing more.

    Args:
        item: None for the whole checkpoint; else one item of an Orbax step by its name, or
            (one of this library's checkpoints, an Orbax item folder) the subtree under one
            top-level key, read as a checkpoint of its own.

        wanted: the top-level keys a restore's target holds: of an Orbax step of several
            items, only those items are opened.

    Raises:
        MissingLeafError: no such item; the message lists those there are.
        The errors of `open_checkpoint` when nothing there is Orbax's either, and those of
        `ckpt._orbax_items.open_orbax` for Orbax checkpoints this library cannot read.
    """
    if store.location.path.endswith(".safetensors"):  # a file, named by the URL
        files = open_safetensors(store)
        if files is not None:
            return _safetensors(files, item)
    try:
        _, manifest = open_checkpoint(store)
        if item is not None:
            manifest = manifest.subtree(item, store.url)
        return _Ours(store, manifest, f"ckpt format {manifest.format_version}", item)
    except CheckpointNotFoundError as exc:
        not_ours = exc
    orbax = open_orbax(store, item, wanted)
    if orbax is None:
        files = open_safetensors(store)
        if files is None:
            raise not_ours
        return _safetensors(files, item)
    log.info("%s is an orbax-checkpoint checkpoint (%s, %d leaves)", orbax.store.url,
             orbax.layout, len(orbax.manifest.leaves))
    return _Orbax(orbax)


def _safetensors(files: SafetensorsFiles, item: str | None) -> Readable:
    if item is not None:
        raise InvalidArgumentError(f"{files.store.url} holds safetensors, which have no items "
                                   f"(item={item!r})")
    log.info("%s holds safetensors (%s, %d tensors)", files.store.url, files.layout,
             len(files.tensors))
    return _SafeTensors(files)
