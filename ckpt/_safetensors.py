"""The safetensors format, both ways: headers read (as untrusted input) and written, files
and Hugging Face folders found, tensors matched to a restore target's leaves by name.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (``{name:
{"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the
tensors' bytes, little-endian, C order, at ``8 + N + begin``. A *folder* holds one file or
several with ``<prefix>.safetensors.index.json`` (``{"metadata": ..., "weight_map": {name:
file}}``), as Hugging Face lays them out.

Called by `ckpt._reader.open_readable` (on every process that restores, inspects or
converts: each reads the headers, never the whole file) and by `ckpt._export`. Headers and
indexes are checked as strictly as this library's manifests: sizes bounded before anything
is read, JSON with no duplicate names, known dtypes, shapes that match their byte ranges,
ranges inside the file and not overlapping, file names that stay inside the folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import tensorstore as ts

from ckpt._format import DTYPE_SIZES, ChunkLayout, LeafKind, LeafRecord, Manifest
from ckpt._leaves import is_array_like
from ckpt._names import NameRules
from ckpt._tree import KeyPath, is_empty_container, is_text, path_text
from ckpt.errors import (
    CorruptCheckpointError,
    DtypeMismatchError,
    InvalidArgumentError,
    MissingLeafError,
    NotACheckpointError,
    ShapeMismatchError,
    TargetMismatchError,
)
from ckpt.storage import (
    DeadlineExceededError,
    ObjectNotFoundError,
    StorageError,
    Store,
    UnreadableObjectError,
    check_key,
    tensorstore_code,
)

SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# The safetensors package refuses larger headers; so does this reader.
MAX_HEADER_BYTES = 100_000_000
MAX_INDEX_BYTES = 64 << 20
MAX_DIMS = 64
# Bound on any tensor's bytes and any offset in a file (and on the product of a zero-size
# shape's other dimensions, which numpy must still be able to index).
MAX_OFFSET = 2**62
# `__metadata__` key of files an export writes, and of its index's ``metadata``: one id per
# export, so that files of two exports are never read as one.
EXPORT_ID = "ckpt_export_id"

# safetensors dtype names and this library's (numpy / ml_dtypes) names.
DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
NAMES = {ours: theirs for theirs, ours in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a file: its dtype (this library's name), shape, and where its bytes
    are (``begin``/``end``: absolute byte offsets in ``file``; ``generation``: the storage
    generation of the file its header was read from, which every read of its bytes must
    find again)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int
    end: int
    generation: bytes = b""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidArgumentError(f"the name {key!r:.80} appears twice")
        out[key] = value
    return out


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {exc}"[:400]) from None
    except RecursionError:
        raise CorruptCheckpointError(f"{what} nests JSON too deeply") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor(name: str, info: Any, file: str, data_start: int, what: str) -> Tensor:
    where = f"{what}: tensor {name!r:.200}"
    if not is_text(name) or not name:
        raise CorruptCheckpointError(f"{what}: a tensor name is empty or not valid text")
    if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or \
            len(info) != 3:
        raise CorruptCheckpointError(f"{where} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CorruptCheckpointError(f"{where} has dtype {dtype!r:.40}, which this library "
                                     f"does not read (it reads {', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
            not all(_is_int(n) and 0 <= n < 2**63 for n in shape):
        raise CorruptCheckpointError(f"{where} has shape {shape!r:.80}: not a list of at "
                                     f"most {MAX_DIMS} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or \
            not all(_is_int(n) and 0 <= n < 2**63 for n in offsets) or offsets[0] > offsets[1]:
        raise CorruptCheckpointError(f"{where} has data_offsets {offsets!r:.80}: not [begin, "
                                     "end] with 0 <= begin <= end")
    ours = DTYPES[dtype]
    if math.prod(n for n in shape if n) * DTYPE_SIZES[ours] >= MAX_OFFSET or \
            data_start + offsets[1] >= MAX_OFFSET:
        raise CorruptCheckpointError(f"{where} ({dtype}{shape}, data_offsets {offsets}) "
                                     f"is over the {MAX_OFFSET} bytes a reader takes")
    nbytes = math.prod(shape) * DTYPE_SIZES[ours]
    if offsets[1] - offsets[0] != nbytes:
        raise CorruptCheckpointError(
            f"{where} ({dtype}{shape}) needs {nbytes} bytes, and its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}")
    return Tensor(name, ours, tuple(shape), file, data_start + offsets[0],
                  data_start + offsets[1])


def parse_header(header: bytes, file: str, what: str) -> tuple[dict[str, str], list[Tensor]]:
    """The ``__metadata__`` and tensors of a header (the JSON after the length), checked.

    Raises:
        CorruptCheckpointError: anything in it is malformed, unknown or inconsistent (names
            the tensor); ranges overlap.
    """
    raw = _json(header, what)
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{what}: the header is not a JSON object")
    meta = raw.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise CorruptCheckpointError(f"{what}: __metadata__ is not a map of strings to strings")
    start = 8 + len(header)
    tensors = [_tensor(name, info, file, start, what) for name, info in raw.items()]
    end = start
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < end and t.end > t.begin:
            raise CorruptCheckpointError(f"{what}: tensor {t.name!r:.200} overlaps the bytes "
                                         "of another")
        end = max(end, t.end)
    return meta, tensors


def encode_header(tensors: Sequence[Tensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a file holding ``tensors`` (whose offsets are
    relative to the data section), padded with spaces to a multiple of 8 bytes as the
    safetensors package writes it, so that every tensor stays aligned to its item size."""
    doc: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for t in tensors:
        doc[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [t.begin, t.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def _read_range(store: Store, kv: Any, key: str, begin: int, end: int,
                what: str) -> tuple[bytes, bytes]:
    """Bytes [begin, end) of ``key`` and the file's storage generation; a file that ends
    before is corrupt."""
    try:
        result = store.wait(kv.read(key, byte_range=slice(begin, end)), f"reading {what}")
    except DeadlineExceededError:
        raise
    except Exception as exc:
        if tensorstore_code(exc) == "OUT_OF_RANGE":
            raise CorruptCheckpointError(f"{what} is shorter than its header says") from None
        if tensorstore_code(exc) == "NOT_FOUND":
            raise ObjectNotFoundError(f"{what} does not exist") from None
        raise StorageError(errno.EIO, f"reading {what} failed: {exc}") from exc
    if result.state != "value":
        raise ObjectNotFoundError(f"{what} does not exist")
    if len(result.value) != end - begin:
        raise CorruptCheckpointError(f"{what} is shorter than its header says")
    return bytes(result.value), bytes(result.stamp.generation)


def read_file_header(store: Store, kv: Any, key: str) -> tuple[dict[str, str], list[Tensor]]:
    """Reads and checks the header of the file ``key`` of ``store``, and that the file is
    as long as the header says (its last data byte is read)."""
    what = store.describe(key)
    prefix, generation = _read_range(store, kv, key, 0, 8, what)
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"{what}: its header claims {length} bytes, over the "
                                     f"{MAX_HEADER_BYTES} a reader takes")
    header, again = _read_range(store, kv, key, 8, 8 + length, what)
    meta, tensors = parse_header(header, key, what)
    last = max((t.end for t in tensors), default=0)
    if again == generation and last > 8 + length:
        again = _read_range(store, kv, key, last - 1, last, what)[1]
    if again != generation:
        raise CorruptCheckpointError(f"{what} was replaced while its header was read")
    return meta, [dataclasses.replace(t, generation=generation) for t in tensors]


@dataclasses.dataclass
class SafetensorsFiles:
    """Safetensors opened for reading: the folder, the tensors by name (across its files),
    and their leaf records as restore without a target sees them.

    Attributes:
        store: the folder the files are in.
        tensors: by name.
        metadata: the ``__metadata__`` of the files (merged; an index's ``metadata`` too).
        manifest: one array record per tensor; its path splits the name at ``.`` (or, when
            some name is another's prefix that way, is the whole name).
        layout: for messages and `ckpt inspect`.
    """

    store: Store
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    manifest: Manifest
    layout: str


def tensor_record(path: KeyPath, t: Tensor) -> LeafRecord:
    """A leaf record for tensor ``t`` at ``path``: one chunk (the reader reads byte ranges
    of the file, not chunks), no checksums (safetensors has none)."""
    nbytes = math.prod(t.shape) * DTYPE_SIZES[t.dtype]
    return LeafRecord(path, LeafKind.ARRAY, source="jax", shape=t.shape, dtype=t.dtype,
                      name=t.name,
                      layout=ChunkLayout(tuple(max(1, n) for n in t.shape), (0,), (nbytes,)))


def _natural_paths(names: Sequence[str]) -> dict[str, KeyPath]:
    """Each name split at ``.``, except names whose split path would hold another's as a
    prefix (``a`` and ``a.b``): those stay whole keys, which hold a ``.`` and so meet no
    split path."""
    split: dict[str, KeyPath] = {n: tuple(("key", part) for part in n.split("."))
                                 for n in names}
    paths = set(split.values())
    prefixes = {p[:i] for p in paths for i in range(1, len(p))}
    clash = {n for n, p in split.items()
             if p in prefixes or any(p[:i] in paths for i in range(1, len(p)))}
    return {n: (("key", n),) if n in clash else p for n, p in split.items()}


def _files(store: Store) -> tuple[list[str], dict[str, str] | None, dict[str, Any]]:
    """The files of a folder, the index's weight map (None without one) and its metadata.
    Empty when nothing there is safetensors."""
    # Plain objects directly in the folder only: a sub-folder named x.safetensors is not one.
    children = sorted(k for k in store.list_sizes() if "/" not in k)
    indexes = [c for c in children if c.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1 and INDEX in indexes:
        indexes = [INDEX]
    if len(indexes) > 1:
        raise NotACheckpointError(f"{store.url} holds several safetensors indexes "
                                  f"({', '.join(indexes[:4])}): name the one to read")
    if not indexes:
        return sorted(c for c in children if c.endswith(SUFFIX)), None, {}
    if SINGLE_FILE in children and indexes == [INDEX]:
        # Loaders disagree on which wins (transformers takes model.safetensors): an export
        # was interrupted between the two, or someone mixed them.
        raise CorruptCheckpointError(
            f"{store.url} holds both {SINGLE_FILE} and {INDEX}: which one is the model is "
            "ambiguous (remove the stale one)")
    what = store.describe(indexes[0])
    data = store.read(indexes[0], max_bytes=MAX_INDEX_BYTES)
    doc = _json(data, what)
    weights = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weights.items()):
        raise CorruptCheckpointError(f"{what} has no weight_map of tensor names to files")
    for file in set(weights.values()):
        if "/" in file or not file.endswith(SUFFIX):
            raise CorruptCheckpointError(f"{what} names {file!r:.100}: not a .safetensors "
                                         "file in the same folder")
        check_key(file)
    meta = doc.get("metadata")
    return sorted(set(weights.values())), weights, meta if isinstance(meta, dict) else {}


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>[0-9]+)-of-(?P<n>[0-9]+)\.safetensors$")


def _check_named(folder: Store, files: list[str]) -> None:
    """Nothing in a folder read as safetensors is named like a safetensors file without
    being one (a folder, a link to nothing): it would be a part of the model left out.

    Raises:
        CorruptCheckpointError: naming it.
    """
    plain = set(files)
    odd = sorted(n for n in folder.list_children() if n.endswith(SUFFIX) and n not in plain
                 and not folder.exists(n))
    if odd:
        raise CorruptCheckpointError(
            f"{folder.describe(odd[0])} is named like a safetensors file but is not one (a "
            "folder, or a link to nothing): remove or rename it")


def _check_whole(folder: Store, files: list[str]) -> None:
    """The files a model is read from make a whole model: every shard of each
    ``<stem>-0000i-of-0000N.safetensors`` series is there (an export killed before its last
    file, or a copy that stopped, leaves a prefix of them).

    Raises:
        CorruptCheckpointError: naming what is missing.
    """
    series: dict[tuple[str, str], set[int]] = {}
    for name in files:
        if (m := _SHARD.match(name)) is not None:
            series.setdefault((m["stem"], m["n"]), set()).add(int(m["i"]))
    for (stem, count), found in sorted(series.items()):
        want = set(range(1, int(count) + 1))
        if found != want:
            missing = [f"{stem}-{i:0{len(count)}d}-of-{count}{SUFFIX}"
                       for i in sorted(want - found)]
            raise CorruptCheckpointError(
                f"{folder.url}: a model in {count} files lacks {len(missing)} of them "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): an "
                "interrupted export or copy; nothing is read from a part of a model")


def open_safetensors(store: Store) -> SafetensorsFiles | None:
    """Opens what is at ``store`` as safetensors: a ``.safetensors`` file (the URL names
    it), or a folder of them; None when there are none there.

    Raises:
        CorruptCheckpointError: a header or index is malformed (names the file); a tensor
            is in two files, or the index names one its file lacks.
    """
    base = store.location.path.rstrip("/").rsplit("/", 1)[-1]
    parent = store.parent() if base.endswith(SUFFIX) else None
    if parent is not None and parent.exists(base):  # the URL names a file
        folder: Store = parent
        files, weights, index_meta = [base], None, dict[str, Any]()
    else:
        folder = store
        files, weights, index_meta = _files(store)
        _check_named(folder, files)
        if not files:
            return None
        _check_whole(folder, files)  # a folder is a whole model (a named file is one file)
    try:
        # A FIFO named like a file would block TensorStore's read forever.
        folder.check_plain_files("", files)
    except UnreadableObjectError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    kv = store_kvstore(folder)
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, Any] = dict(index_meta)
    index_id = index_meta.get(EXPORT_ID)
    exports: set[Any] = {index_id} if isinstance(index_id, str) else set()
    for file in files:
        try:
            meta, found = read_file_header(folder, kv, file)
        except ObjectNotFoundError:
            raise CorruptCheckpointError(f"{folder.describe(file)}, which the index names, is "
                                         "missing") from None
        if EXPORT_ID in meta:
            exports.add(meta[EXPORT_ID])
        if len(exports) > 1:
            raise CorruptCheckpointError(
                f"{folder.url}: {file} was written by another export than the other files "
                f"(an interrupted overwrite): {EXPORT_ID} differs")
        metadata.update(meta)
        for t in found:
            if weights is not None and weights.get(t.name) != file:
                continue  # the index says which file holds it
            if t.name in tensors:
                raise CorruptCheckpointError(
                    f"{folder.url}: tensor {t.name!r:.200} is in both {tensors[t.name].file} "
                    f"and {file}")
            tensors[t.name] = t
    if weights is not None:
        lacking = [n for n in weights if n not in tensors]
        if lacking:
            raise CorruptCheckpointError(
                f"{folder.url}: the index names tensors their files lack: "
                + ", ".join(f"{n!r:.100} ({weights[n]})" for n in lacking[:5]))
    paths = _natural_paths(list(tensors))
    leaves = [tensor_record(paths[n], t) for n, t in tensors.items()]
    manifest = Manifest(attempt="", process_count=1, created_at=0.0, committed_at=0.0,
                        versions={}, metadata=metadata or None, leaves=leaves)
    layout = f"safetensors ({len(files)} file{'s' if len(files) > 1 else ''})"
    return SafetensorsFiles(folder, tensors, metadata, manifest, layout)


def store_kvstore(store: Store) -> Any:
    """The TensorStore kvstore of ``store``'s folder (ranged reads of its files)."""
    return store.wait(ts.KvStore.open(store.kvstore_spec(), context=store.tensorstore_context()),
                      f"opening {store.url}")


def bind(files: SafetensorsFiles, pairs: Sequence[tuple[KeyPath, Any]],
         rules: NameRules) -> Manifest:
    """The manifest that restores ``pairs`` (a target's key paths and leaves) from
    ``files``: each target leaf's record is the tensor `NameRules.name` names for it, at the
    leaf's own path.

    Raises:
        MissingLeafError: a target leaf has no tensor (the rules drop it, or the files lack
            it); a tensor no target leaf takes that the rules do not drop (names them).
        ShapeMismatchError, DtypeMismatchError: a tensor differs from its leaf (names both).
        TargetMismatchError: a target leaf is not an array.
    """
    url = files.store.url
    records, dropped, missing, wrong_kind = [], [], [], []
    shapes, dtypes, used = [], [], set()
    for path, leaf in pairs:
        if leaf is None:
            records.append(LeafRecord(path, LeafKind.NONE))
            continue
        if is_empty_container(leaf):
            continue  # needs nothing stored: comes back as it is
        name = rules.name(path)
        if not is_array_like(leaf):
            wrong_kind.append(f"{path_text(path)} is {type(leaf).__name__}")
            continue
        if name is None:
            dropped.append(path_text(path))
            continue
        t = files.tensors.get(name)
        if t is None:
            near = difflib.get_close_matches(name, list(files.tensors), n=3, cutoff=0.5)
            missing.append(f"{path_text(path)} (tensor {name!r}; "
                           + (f"the nearest names the file holds: {', '.join(map(repr, near))}"
                              if near else "no name the file holds is close") + ")")
            continue
        used.add(name)
        if tuple(leaf.shape) != t.shape:
            shapes.append(f"tensor {name!r} ({t.file}) is {list(t.shape)}, target "
                          f"{path_text(path)} is {list(leaf.shape)}")
        dtype = getattr(leaf.dtype, "name", str(leaf.dtype))
        if dtype != t.dtype:
            dtypes.append(f"tensor {name!r} ({t.file}) is {t.dtype}, target {path_text(path)} "
                          f"is {dtype}")
        records.append(tensor_record(path, t))
    if wrong_kind:
        raise TargetMismatchError(f"{url} holds only tensors; target leaves that are not "
                                  f"arrays: {', '.join(wrong_kind[:10])}")
    if dropped:
        raise MissingLeafError(f"target leaves the name rules leave out, so no tensor of {url} "
                               f"fills them: {', '.join(dropped[:10])} (leave them out of the "
                               "target, or add a 'keep' rule)")
    if missing:
        raise MissingLeafError(f"target leaves with no tensor in {url}: "
                               f"{', '.join(missing[:10])}"
                               + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    extra = [n for n in files.tensors if n not in used and not rules.ignores(n)]
    if extra:
        raise MissingLeafError(f"tensors of {url} that no target leaf takes: "
                               + ", ".join(repr(n) for n in extra[:10])
                               + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
                               + " (add them to the target, or a 'drop' rule)")
    if shapes:
        raise ShapeMismatchError(f"target shape mismatch against {url}: " + "; ".join(shapes))
    if dtypes:
        raise DtypeMismatchError(f"target dtype mismatch against {url}: " + "; ".join(dtypes))
    return dataclasses.replace(files.manifest, leaves=records)
