"""On-disk format v1: object names, the manifest, host reports and the COMMIT record.

docs/format.md is the authority; this module is its executable form. Everything is msgpack
with only maps, arrays, strings, binary, integers, floats, booleans and nil: decoding can
never construct an object or run code. Decoding validates every field it uses and raises
`CorruptCheckpointError` naming the object and field otherwise.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import msgpack

from ckpt import _codecs
from ckpt._tree import KeyPath, path_text, python_path
from ckpt.errors import CorruptCheckpointError, MissingLeafError, UnsupportedFormatError
from ckpt.storage import Store, UnreadableObjectError

FORMAT_VERSION = 1
# Version 2 is version 1 plus compressed arrays (a leaf's `compression`): written only by a
# save that compresses, so that a reader of version 1 refuses it by its version.
COMPRESSED_FORMAT_VERSION = 2
READ_VERSIONS = (FORMAT_VERSION, COMPRESSED_FORMAT_VERSION)
FORMAT_NAME = "ckpt"
COMMIT = "COMMIT"
CLAIMS = "claims"    # claims/<attempt>: who may act on an attempt (see ckpt/_claims.py)
REWIND = "REWIND"    # <root>/REWIND: a manager rewind in progress (see ckpt/_manager.py)
LINEAGE = "LINEAGE"  # <root>/LINEAGE: the rewinds and deletes local copies must not outlive
MANIFEST = "manifest.msgpack"
HOSTS = "hosts"
ARRAYS = "arrays"
ATTEMPT_PREFIX = "attempt-"

# Untrusted input bounds: a manifest or report larger than this, or nested deeper, is refused
# before it is decoded, so a hostile checkpoint cannot exhaust memory.
MAX_OBJECT_BYTES = 1 << 30
MAX_COMMIT_BYTES = 1 << 16

MAX_NDIM = 64
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_%@#~.-")
SOURCES = ("jax", "numpy", "numpy_scalar")
# The format's dtype names (docs/format.md) and their sizes in bytes.
DTYPE_SIZES = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


class LeafKind(enum.StrEnum):
    """How a leaf is stored (docs/format.md): ``array`` (a zarr array under
    ``arrays/<name>/``), ``inline`` (a small array whose bytes are in the manifest), ``value``
    (a Python scalar or string), ``none``, ``empty`` (an empty container, so that it
    round-trips: ``vtype`` ``dict`` or ``list``), or ``per_process`` (a value each process
    saved for itself: ``vtype`` ``value`` for `ckpt.PerProcess`, ``state`` for an object's
    ``get_state()``, ``json`` for an iterator state Grain's checkpoint handler wrote as JSON
    text (read from Orbax steps); ``value`` the list of them, by process index)."""

    ARRAY = "array"
    INLINE = "inline"
    VALUE = "value"
    NONE = "none"
    EMPTY = "empty"
    PER_PROCESS = "per_process"


# What an empty container comes back as without a target (`LeafKind.EMPTY`'s vtype).
EMPTY_VTYPES = ("dict", "list")
# What a per-process leaf was (`LeafKind.PER_PROCESS`'s vtype): a `ckpt.PerProcess`, an
# object with get_state()/set_state() (a Grain iterator), or such an object's state as the
# JSON text Grain's own checkpoint handler writes (`ckpt._orbax_items`).
PER_PROCESS_VTYPES = ("value", "state", "json")


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How an ``array`` leaf is stored: its regular chunk grid, and per chunk (C order of the
    grid) the process that writes it, its bytes and the crc32c of its bytes.

    Planned by a save (`ckpt._ownership`) or a rewrite with zero checksums; the checksums
    come from the host reports at commit (`with_crc32c`).
    """

    chunk_shape: tuple[int, ...] = ()
    writers: tuple[int, ...] = ()
    nbytes: tuple[int, ...] = ()
    crc32c: tuple[int, ...] = ()

    @classmethod
    def planned(cls, chunk_shape: Sequence[int], writers: Sequence[int],
                nbytes: Sequence[int]) -> ChunkLayout:
        """A layout as planned, before any chunk is written: its checksums are zero until
        the host reports fill them in at commit."""
        return cls(tuple(chunk_shape), tuple(writers), tuple(nbytes), (0,) * len(writers))

    def with_crc32c(self, crc32c: Sequence[int]) -> ChunkLayout:
        return dataclasses.replace(self, crc32c=tuple(crc32c))


@dataclasses.dataclass(frozen=True)
class LeafRecord:
    """One leaf of the saved tree, as the manifest records it (immutable: a changed record
    is a new one, `dataclasses.replace`)."""

    path: KeyPath
    kind: LeafKind
    source: str = "numpy"
    shape: tuple[int, ...] = ()
    dtype: str = ""
    mesh_shape: tuple[int, ...] | None = None
    mesh_axes: tuple[str, ...] | None = None
    spec: list[Any] | None = None
    name: str = ""
    layout: ChunkLayout = ChunkLayout()
    data: bytes = b""
    value: Any = None
    vtype: str = ""
    prng_impl: str = ""
    compression: str = ""  # an array's: "" or "zstd:<level>" (`ckpt._codecs`)

    def spec_entries(self) -> tuple[str | tuple[str, ...] | None, ...]:
        """The saved PartitionSpec as PartitionSpec arguments (lists become tuples); () if
        the leaf was saved without one."""
        return tuple(e if e is None or isinstance(e, str) else tuple(e)
                     for e in (self.spec or ()))

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return self.layout.chunk_shape

    @property
    def writers(self) -> tuple[int, ...]:
        return self.layout.writers

    @property
    def chunk_nbytes(self) -> tuple[int, ...]:
        return self.layout.nbytes

    @property
    def chunk_crc32c(self) -> tuple[int, ...]:
        return self.layout.crc32c

    @property
    def nbytes(self) -> int:
        """Bytes of array data this leaf holds (0 for values)."""
        return sum(self.chunk_nbytes) if self.kind == LeafKind.ARRAY else len(self.data)


@dataclasses.dataclass
class Manifest:
    """The manifest of one attempt: everything needed to restore without listing anything."""

    attempt: str
    process_count: int
    created_at: float
    committed_at: float
    versions: dict[str, str]
    metadata: Any
    leaves: list[LeafRecord]
    format_version: int = FORMAT_VERSION
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # A local-tier copy's (`ckpt._local`): {"process": writer's index, "step": step,
    # "root": the persistent root's URL, "lineage": the root's lineage mark}.
    local: dict[str, Any] | None = None
    # A manager step's ancestry (a manager with a local tier writes it, on both tiers): the
    # [step, attempt] of each save of the run this one descends from, oldest first, since
    # the newest step the persistent root held when the run reached it.
    parents: list[list[Any]] | None = None

    def __post_init__(self) -> None:
        if any(leaf.compression for leaf in self.leaves):
            self.format_version = max(self.format_version, COMPRESSED_FORMAT_VERSION)

    def subtree(self, item: str, url: str) -> Manifest:
        """This manifest's leaves under the top-level key ``item``, that key dropped from
        their paths: what ``item=`` reads of a checkpoint that is one tree.

        Raises:
            MissingLeafError: no leaf is under ``item`` (the message lists the keys there are).
        """
        head = ("key", item)
        leaves = [dataclasses.replace(r, path=r.path[1:]) for r in self.leaves
                  if r.path[:1] == (head,)]
        if not leaves:
            keys = sorted({str(r.path[0][1]) for r in self.leaves if r.path})
            raise MissingLeafError(f"{url} has no item {item!r} (its top-level keys: "
                                   f"{', '.join(keys) or 'none'})")
        return dataclasses.replace(self, leaves=leaves)


def pack(obj: Any) -> bytes:
    """Encodes plain data as msgpack (never with an extension or object hook)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)  # msgpack ships no type hints
    return data


def read_object(store: Store, key: str, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
    """Reads one of the format's small objects (COMMIT, a manifest, a host report, a claim),
    never more than ``max_bytes`` of it: its size is untrusted until read.

    Raises:
        ObjectNotFoundError: it does not exist.
        CorruptCheckpointError: it is larger than ``max_bytes``, or not a regular file.
    """
    try:
        return store.read(key, max_bytes=max_bytes)
    except UnreadableObjectError as exc:
        raise CorruptCheckpointError(str(exc)) from None


def unpack(data: bytes, what: str) -> Any:
    """Decodes untrusted msgpack with size limits; errors name ``what``."""
    if len(data) > MAX_OBJECT_BYTES:
        raise CorruptCheckpointError(f"{what} is {len(data)} bytes, over the limit")
    try:
        # unpackb bounds every string, binary, array and map length by the input's size,
        # and nesting by a fixed stack depth (StackError).
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptCheckpointError(f"{what} is not valid msgpack: {exc}") from exc


def _leaf_to_dict(leaf: LeafRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"path": [list(e) for e in leaf.path], "kind": str(leaf.kind)}
    if leaf.kind in (LeafKind.ARRAY, LeafKind.INLINE):
        out.update(source=leaf.source, shape=list(leaf.shape), dtype=leaf.dtype)
        if leaf.prng_impl:
            out["prng_impl"] = leaf.prng_impl
        if leaf.mesh_shape is not None:
            out.update(mesh={"shape": list(leaf.mesh_shape),
                             "axis_names": list(leaf.mesh_axes or ())}, spec=leaf.spec)
    if leaf.kind == LeafKind.ARRAY:
        out.update(name=leaf.name, chunk_shape=list(leaf.chunk_shape),
                   chunks={"writer": list(leaf.writers), "nbytes": list(leaf.chunk_nbytes),
                           "crc32c": list(leaf.chunk_crc32c)})
        if leaf.compression:
            out["compression"] = _codecs.to_manifest(leaf.compression)
    elif leaf.kind == LeafKind.INLINE:
        out["data"] = leaf.data
    elif leaf.kind == LeafKind.VALUE:
        out.update(value=leaf.value, vtype=leaf.vtype)
    elif leaf.kind == LeafKind.EMPTY:
        out["vtype"] = leaf.vtype
    elif leaf.kind == LeafKind.PER_PROCESS:
        out.update(vtype=leaf.vtype, values=list(leaf.value))
    return out


def encode_manifest(m: Manifest) -> bytes:
    """Serialises a manifest; its sha256 is what COMMIT records."""
    return pack({
        "format": FORMAT_NAME, "format_version": m.format_version, "attempt": m.attempt,
        "process_count": m.process_count, "created_at": m.created_at,
        "committed_at": m.committed_at, "versions": m.versions, "metadata": m.metadata,
        "metrics": m.metrics,
        "leaves": [_leaf_to_dict(leaf) for leaf in m.leaves],
        **({} if m.local is None else {"local": m.local}),
        **({} if m.parents is None else {"parents": m.parents}),
    })


class _Reader:
    """Typed access to a decoded map; every failure names the object and field."""

    def __init__(self, obj: Any, what: str) -> None:
        if not isinstance(obj, dict):
            raise CorruptCheckpointError(f"{what} is not a map")
        self.obj, self.what = obj, what

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.obj:
            if default is not ...:
                return default
            raise CorruptCheckpointError(f"{self.what} lacks field {key!r}")
        value = self.obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise CorruptCheckpointError(f"{self.what} field {key!r} has the wrong type")
        return value

    def ints(self, key: str, low: int = 0) -> tuple[int, ...]:
        values = self.get(key, list)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
            raise CorruptCheckpointError(f"{self.what} field {key!r} must hold integers >= {low}")
        return tuple(values)


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _decode_path(raw: Any, what: str) -> KeyPath:
    if not isinstance(raw, list):
        raise CorruptCheckpointError(f"{what} path is not a list")
    path = []
    for entry in raw:
        ok = (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("key", "index", "attr")
              and isinstance(entry[1], (str, int)) and not isinstance(entry[1], bool))
        if not ok:
            raise CorruptCheckpointError(f"{what} has a malformed key path entry {entry!r:.80}")
        path.append((entry[0], entry[1]))
    return tuple(path)


_ARRAY_FIELDS = {"path", "kind", "source", "shape", "dtype", "prng_impl", "mesh", "spec"}
# The fields `_leaf_to_dict` writes for each kind, and no others.
_LEAF_FIELDS = {
    LeafKind.ARRAY: _ARRAY_FIELDS | {"name", "chunk_shape", "chunks", "compression"},
    LeafKind.INLINE: _ARRAY_FIELDS | {"data"},
    LeafKind.VALUE: {"path", "kind", "value", "vtype"},
    LeafKind.NONE: {"path", "kind"},
    LeafKind.EMPTY: {"path", "kind", "vtype"},
    LeafKind.PER_PROCESS: {"path", "kind", "vtype", "values"},
}


_KIND_NAMES = frozenset(LeafKind)  # (built once: a set of an enum costs per leaf)


def _decode_leaf(raw: Any, index: int, what: str, local: bool = False) -> LeafRecord:
    r = _Reader(raw, f"{what} leaf {index}")
    path = _decode_path(r.get("path", list), r.what)
    kind_name = r.get("kind", str)
    if kind_name not in _KIND_NAMES:
        raise CorruptCheckpointError(f"{r.what} has unknown kind {kind_name!r:.40}")
    kind = LeafKind(kind_name)
    extra = set(r.obj) - _LEAF_FIELDS[kind]
    if extra:
        # A record that says one kind and carries another's fields was not written by this
        # format: trusting its kind could turn a saved array into None.
        shown = sorted(map(repr, extra))
        raise CorruptCheckpointError(f"{r.what} ({path_text(path)}) is a {kind_name!r} "
                                     f"leaf with fields it cannot have: {shown}")
    fields: dict[str, Any] = {}
    if kind in (LeafKind.ARRAY, LeafKind.INLINE):
        fields["source"] = source = r.get("source", str)
        if source not in SOURCES:
            raise CorruptCheckpointError(f"{r.what} has unknown source {source!r:.40}")
        fields["shape"] = shape = r.ints("shape")
        fields["dtype"] = dtype = r.get("dtype", str)
        fields["prng_impl"] = r.get("prng_impl", str, "")
        if len(shape) > MAX_NDIM:
            raise CorruptCheckpointError(f"{r.what} has {len(shape)} dimensions")
        if dtype not in DTYPE_SIZES:
            raise CorruptCheckpointError(f"{r.what} ({path_text(path)}) has unsupported "
                                         f"dtype {dtype!r:.40}")
        mesh = r.get("mesh", dict, None)
        if mesh is not None:
            mr = _Reader(mesh, f"{r.what} mesh")
            fields["mesh_shape"] = mesh_shape = mr.ints("shape")
            axes = mr.get("axis_names", list)
            if not all(isinstance(a, str) for a in axes) or len(axes) != len(mesh_shape):
                raise CorruptCheckpointError(f"{r.what} mesh axis names are malformed")
            fields["mesh_axes"] = tuple(axes)
            fields["spec"] = r.get("spec", (list, type(None)))
    if kind == LeafKind.ARRAY:
        fields["name"] = name = r.get("name", str)
        chunk_shape = r.ints("chunk_shape")
        chunks = _Reader(r.get("chunks", dict), f"{r.what} chunks")
        # A local copy: writer -1 marks a chunk the copy does not hold.
        writers = tuple(chunks.ints("writer", low=-1)) if local else chunks.ints("writer")
        layout = ChunkLayout(chunk_shape, writers, chunks.ints("nbytes"), chunks.ints("crc32c"))
        if not name or name[0] == "." or not set(name) <= _NAME_CHARS:
            raise CorruptCheckpointError(f"{r.what} has an unsafe array name {name!r:.80}")
        if len(chunk_shape) != len(shape) or 0 in chunk_shape:
            raise CorruptCheckpointError(f"{r.what} chunk shape does not fit its shape")
        count = 1
        for n, c in zip(shape, chunk_shape, strict=True):
            count *= -(-n // c)
        if not count == len(layout.writers) == len(layout.nbytes) == len(layout.crc32c):
            raise CorruptCheckpointError(
                f"{r.what} ({path_text(path)}) lists {len(layout.writers)} chunks; its shape "
                f"and chunk shape make {count}")
        fields["layout"] = layout
        if "compression" in r.obj:
            fields["compression"] = _codecs.from_manifest(r.obj["compression"], r.what)
    elif kind == LeafKind.INLINE:
        fields["data"] = data = r.get("data", bytes)
        need = math.prod(shape) * DTYPE_SIZES[dtype]
        if len(data) != need:
            raise CorruptCheckpointError(
                f"{r.what} ({path_text(path)}) holds {len(data)} bytes; its shape and "
                f"dtype need {need}")
    elif kind == LeafKind.VALUE:
        fields["vtype"] = r.get("vtype", str)
        fields["value"] = r.obj.get("value")
    elif kind == LeafKind.EMPTY:
        fields["vtype"] = vtype = r.get("vtype", str)
        if vtype not in EMPTY_VTYPES:
            raise CorruptCheckpointError(f"{r.what} ({path_text(path)}) is an empty container of "
                                         f"unknown type {vtype!r:.40}")
    elif kind == LeafKind.PER_PROCESS:
        fields["vtype"] = vtype = r.get("vtype", str)
        fields["value"] = values = r.get("values", list)
        if vtype not in PER_PROCESS_VTYPES or not values or (
                vtype == "json" and not all(isinstance(v, str) for v in values)):
            raise CorruptCheckpointError(f"{r.what} ({path_text(path)}) is a malformed "
                                         f"per-process leaf")
    leaf = LeafRecord(path=path, kind=kind, **fields)
    if kind == LeafKind.ARRAY:
        _check_chunk_sizes(leaf, r.what)
    return leaf


def _check_chunk_sizes(leaf: LeafRecord, what: str) -> None:
    """Every chunk's recorded size is its box's: readers size buffers from the shape, so a
    shape the chunks do not bear out must fail here, before anything is allocated from it.
    The chunk count was checked against the lists, which bounds the work."""
    if not leaf.chunk_nbytes:  # a zero-size dimension: no chunks, nothing to size
        return
    itemsize = DTYPE_SIZES[leaf.dtype]
    extents = [[min(c, n - i) for i in range(0, n, c)]
               for n, c in zip(leaf.shape, leaf.chunk_shape, strict=True)]
    # itertools.product varies the last axis fastest: the chunks' C order.
    for flat, box in enumerate(itertools.product(*extents)):
        if leaf.chunk_nbytes[flat] != math.prod(box) * itemsize:
            raise CorruptCheckpointError(
                f"{what} ({path_text(leaf.path)}) records {leaf.chunk_nbytes[flat]} bytes for "
                f"chunk {flat}; its shape, chunk shape and dtype make "
                f"{math.prod(box) * itemsize}")


def decode_manifest(data: bytes, what: str) -> Manifest:
    """Parses and validates a manifest.

    Raises:
        CorruptCheckpointError: malformed content (the message names ``what`` and the field).
        UnsupportedFormatError: a format version this library does not know.
    """
    r = _Reader(unpack(data, what), what)
    if r.get("format", str, None) != FORMAT_NAME:
        raise CorruptCheckpointError(f"{what} is not a checkpoint manifest")
    version = r.get("format_version", int)
    if version not in READ_VERSIONS:
        raise UnsupportedFormatError(
            f"{what} has format version {version}; this library reads versions "
            f"{READ_VERSIONS[0]} to {READ_VERSIONS[-1]}"
            + (" (upgrade the library)" if version > READ_VERSIONS[-1] else ""))
    leaves = r.get("leaves", list)
    versions = r.get("versions", dict)
    metrics = r.get("metrics", dict, {})
    if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
               for k, v in metrics.items()):
        raise CorruptCheckpointError(f"{what} has malformed metrics")
    local = r.get("local", (dict, type(None)), None)
    if local is not None and (set(local) - {"replicas_of"} != {"process", "step", "root",
                                                               "lineage"} or not all(
            type(local[k]) is int and local[k] >= 0 for k in ("process", "step"))
            or not isinstance(local["root"], str) or not isinstance(local["lineage"], str)
            or not _process_list(local.get("replicas_of", []), local["process"])):
        raise CorruptCheckpointError(f"{what} has a malformed local-copy record")
    parents = r.get("parents", (list, type(None)), None)
    if parents is not None and not all(
            isinstance(p, list) and len(p) == 2 and type(p[0]) is int and p[0] >= 0
            and isinstance(p[1], str) and p[1].startswith(ATTEMPT_PREFIX) for p in parents):
        raise CorruptCheckpointError(f"{what} has a malformed parents record")
    records = [_decode_leaf(leaf, i, what, local is not None) for i, leaf in enumerate(leaves)]
    if version < COMPRESSED_FORMAT_VERSION and any(rec.compression for rec in records):
        raise CorruptCheckpointError(f"{what} has compressed arrays in format version "
                                     f"{version}, which has none")
    paths: set[KeyPath] = set()
    names: set[str] = set()
    for rec in records:
        # One record per key path and one array folder per record: a duplicate would make
        # restore keep one of two leaves, or read one leaf's data for another.
        if rec.path in paths:
            raise CorruptCheckpointError(f"{what} lists leaf {path_text(rec.path)} twice")
        paths.add(rec.path)
        if rec.kind == LeafKind.ARRAY:
            if rec.name in names:
                raise CorruptCheckpointError(
                    f"{what}: leaf {path_text(rec.path)} names array {rec.name!r}, which another "
                    f"leaf names too")
            names.add(rec.name)
    return Manifest(
        attempt=r.get("attempt", str), process_count=r.get("process_count", int),
        created_at=float(r.get("created_at", (int, float))),
        committed_at=float(r.get("committed_at", (int, float))),
        versions={str(k): str(v) for k, v in versions.items()},
        metadata=r.obj.get("metadata"),
        leaves=records, format_version=version,
        metrics={k: float(v) for k, v in metrics.items()}, local=local, parents=parents)


def _process_list(value: Any, writer: int) -> bool:
    """Whether ``value`` is a local copy's ``replicas_of``: distinct process indices in
    ascending order, without the copy's own."""
    return isinstance(value, list) and all(type(p) is int and p >= 0 and p != writer
                                           for p in value) and value == sorted(set(value))


def check_tree(records: Sequence[LeafRecord], what: str) -> None:
    """The leaves' key paths must make one tree where a restore without a target builds it
    (nested dicts and lists): no leaf's path inside another leaf's, the children of each
    container all sequence positions or all names, no name twice. (Positions may have
    gaps: a pytree node without children leaves one.) Called before such a tree is built
    (`ckpt.restore` without a target, `ckpt.metadata`), not when a manifest is read: a
    target names its leaves itself.

    Raises:
        CorruptCheckpointError: naming the leaf that breaks it.
    """
    children: dict[KeyPath, dict[Any, str]] = {}
    leaves = {rec.path for rec in records}
    for rec in records:
        path = rec.path
        for depth, (kind, key) in enumerate(path):
            parent = path[:depth]
            if parent in leaves:
                raise CorruptCheckpointError(
                    f"{what}: leaf {path_text(path)} lies inside leaf {path_text(parent)}")
            seen = children.setdefault(parent, {})
            slot = ("index", key) if kind == "index" else ("name", key)
            if any(k[0] != slot[0] for k in seen):
                raise CorruptCheckpointError(
                    f"{what}: leaf {path_text(path)} mixes sequence positions and names under "
                    f"{path_text(parent)}")
            if slot in seen and seen[slot] != kind:
                raise CorruptCheckpointError(
                    f"{what}: leaf {path_text(path)} names {key!r} twice under "
                    f"{path_text(parent)}")
            seen[slot] = kind


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """The content of COMMIT: which attempt won and the digest of its manifest."""

    attempt: str
    manifest_sha256: str
    committed_at: float
    format_version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        return pack({"format": FORMAT_NAME, "format_version": self.format_version,
                     "attempt": self.attempt, "manifest_sha256": self.manifest_sha256,
                     "committed_at": self.committed_at})

    @staticmethod
    def decode(data: bytes, what: str) -> CommitRecord:
        if len(data) > MAX_COMMIT_BYTES:
            raise CorruptCheckpointError(f"{what} is {len(data)} bytes, over the limit")
        r = _Reader(unpack(data, what), what)
        if r.get("format", str, None) != FORMAT_NAME:
            raise CorruptCheckpointError(f"{what} is not a checkpoint COMMIT record")
        version = r.get("format_version", int)
        if version != FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{what} has format version {version}; this library reads version "
                f"{FORMAT_VERSION}"
                + (" (upgrade the library)" if version > FORMAT_VERSION else ""))
        attempt = r.get("attempt", str)
        if not attempt.startswith(ATTEMPT_PREFIX) or "/" in attempt or ".." in attempt:
            raise CorruptCheckpointError(f"{what} names an invalid attempt {attempt!r:.80}")
        return CommitRecord(attempt=attempt, manifest_sha256=r.get("manifest_sha256", str),
                            committed_at=float(r.get("committed_at", (int, float))),
                            format_version=version)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def host_report_key(attempt: str, process: int) -> str:
    return f"{attempt}/{HOSTS}/{process}.msgpack"


def array_key(attempt: str, name: str) -> str:
    """The folder of array leaf ``name``'s zarr array in ``attempt``."""
    return f"{attempt}/{ARRAYS}/{name}"


@dataclasses.dataclass(frozen=True)
class HostReport:
    """What one process of a save wrote, and what it saved, for process 0 to compare.

    ``chunks``: ``(leaf name, flat chunk index, nbytes, crc32c)`` rows. ``tree``: a digest
    of the tree's structure (every leaf's path, kind, dtype and shape) and ``values``: the
    crc32c of each numpy leaf and Python value, by key path; both empty for a job of one
    process, which has nothing to compare. ``per_process``: this process's own value of each
    ``per_process`` leaf, by its position in the tree's leaves (process 0 gathers them into
    the manifest).
    """

    process: int
    chunks: list[tuple[str, int, int, int]]
    tree: str = ""
    values: dict[str, int] = dataclasses.field(default_factory=dict)
    per_process: list[tuple[int, Any]] = dataclasses.field(default_factory=list)


def encode_host_report(attempt: str, report: HostReport) -> bytes:
    return pack({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "attempt": attempt,
                 "process": report.process, "chunks": [list(r) for r in report.chunks],
                 "tree": report.tree, "values": report.values,
                 "per_process": [[i, v] for i, v in report.per_process]})


def decode_host_report(data: bytes, what: str) -> HostReport:
    r = _Reader(unpack(data, what), what)
    rows = []
    for row in r.get("chunks", list):
        ok = (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
              and all(isinstance(v, int) and not isinstance(v, bool) for v in row[1:]))
        if not ok:
            raise CorruptCheckpointError(f"{what} has a malformed chunk row")
        rows.append((row[0], row[1], row[2], row[3]))
    values = r.get("values", dict, {})
    if not all(isinstance(k, str) and isinstance(v, int) for k, v in values.items()):
        raise CorruptCheckpointError(f"{what} has malformed value digests")
    own = r.get("per_process", list, [])
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int)
               and not isinstance(p[0], bool) for p in own):
        raise CorruptCheckpointError(f"{what} has malformed per-process values")
    return HostReport(r.get("process", int), rows, r.get("tree", str, ""), values,
                      [(p[0], p[1]) for p in own])


# The metadata object of a zarr v3 array, in its folder.
ZARR_JSON = "zarr.json"


def zarr_metadata(rec: LeafRecord) -> dict[str, Any]:
    """An ``array`` leaf's zarr v3 metadata (docs/format.md, "Arrays"), from its record."""
    fill: Any = 0.0 if rec.dtype.startswith(("float", "bfloat")) else 0
    if rec.dtype == "bool":
        fill = False
    elif rec.dtype.startswith("complex"):
        fill = [0.0, 0.0]
    codecs = _codecs.zarr_codecs(rec.compression)
    if DTYPE_SIZES[rec.dtype] == 1:  # zarr v3 gives single-byte types no byte order
        codecs[0] = {"name": "bytes"}
    return {
        "zarr_format": 3, "node_type": "array",
        "shape": list(rec.shape),
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": list(rec.chunk_shape)}},
        "chunk_key_encoding": {"name": "default"},
        "data_type": rec.dtype,
        "fill_value": fill,
        "codecs": codecs,
        "attributes": {"ckpt_key_path": python_path(rec.path)},
    }


def zarr_json(rec: LeafRecord) -> bytes:
    """The ``zarr.json`` of an ``array`` leaf, byte for byte as TensorStore writes it
    (sorted keys, no spaces). Written by the process that creates an attempt's arrays
    (`ckpt._attempt.open_arrays`) through its store, in one batch for all of them."""
    return json.dumps(zarr_metadata(rec), sort_keys=True, separators=(",", ":")).encode()


def zarr_spec(kvstore: dict[str, Any], rec: LeafRecord) -> dict[str, Any]:
    """The TensorStore spec that writes chunks of an ``array`` leaf's zarr v3 array at
    ``kvstore``: its metadata assumed, never read or written (`zarr_json` is written
    through the store), so writers never wait for each other or for ``zarr.json``."""
    metadata = zarr_metadata(rec)
    del metadata["zarr_format"], metadata["node_type"]
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": metadata,
        # Chunks equal to the fill value are stored too, so a missing chunk always means a
        # lost chunk, never zeros.
        "store_data_equal_to_fill_value": True,
        "open": True, "assume_metadata": True,
    }


# Arrays stored as plain objects (`plain_chunks`) have chunks of at most this many bytes: at
# that size a TensorStore array's set-up (about half a millisecond an array) outweighs the
# chunk's own read or write.
PLAIN_CHUNK_BYTES = 1 << 20


def plain_chunks(rec: LeafRecord) -> bool:
    """Whether an ``array`` leaf's chunks are written, and (of a one-chunk array) read, as
    plain objects through the store instead of a TensorStore array: uncompressed, every
    chunk whole (the shape a multiple of the chunk shape: TensorStore pads edge chunks) and
    at most `PLAIN_CHUNK_BYTES`. The objects are the same bytes a zarr v3 writer stores
    (`chunk_object`); this decides only who encodes them. Asked by the save path
    (`ckpt._attempt.open_arrays`) and by restore (`ckpt._reader`)."""
    return (rec.kind == LeafKind.ARRAY and not rec.compression
            and all(c > 0 and s % c == 0 for s, c in zip(rec.shape, rec.chunk_shape,
                                                           strict=True))
            and math.prod(rec.chunk_shape) * DTYPE_SIZES[rec.dtype] <= PLAIN_CHUNK_BYTES)


def chunk_object(little: Any, crc: int) -> bytes:
    """The stored object of an uncompressed chunk (docs/format.md, "Arrays"): its bytes in
    C order, little-endian (``little``, a C-contiguous array of them), then ``crc``, their
    crc32c, as 4 little-endian bytes: what zarr v3's ``bytes`` and ``crc32c`` codecs
    write."""
    return b"".join((little.reshape(-1).view("uint8"), crc.to_bytes(4, "little")))


def array_read_spec(kvstore: dict[str, Any], rec: LeafRecord) -> dict[str, Any]:
    """The TensorStore spec that reads an ``array`` leaf: what it decodes (dtype, shape,
    chunk grid, codecs, fill value) comes from the manifest record, never from the stored
    ``zarr.json``. TensorStore still reads ``zarr.json`` and fails with FAILED_PRECONDITION
    when it disagrees, so an edited one is reported instead of changing the values.
    Missing chunks are errors, not fill values.

    Called by every reader of this format: restore, ``ckpt verify``, ``ckpt reshard``.
    """
    spec = zarr_spec(kvstore, rec)
    del spec["assume_metadata"]
    spec.update(fill_missing_data_reads=False, recheck_cached_data=False)
    return spec
