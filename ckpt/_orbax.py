"""Reading checkpoints written by orbax-checkpoint, as if they were this library's: what
Orbax wrote at a URL (`recognise`), its pytree items, its step metadata.

Called through `ckpt._orbax_items.open_orbax` when a URL holds no COMMIT, on every process
that restores, inspects or converts. An Orbax checkpoint is recognised from its files, never
from its name:

- an *item folder* (what `StandardCheckpointer`, `PyTreeCheckpointer` and each item of a
  `CheckpointManager` step write) holds ``_METADATA``: the JSON tree of key paths and value
  types. Its arrays are zarr v2 or v3 arrays named by their dotted key path, either as
  sub-folders (``params.w/.zarray``) or inside an OCDBT database (``manifest.ocdbt``,
  ``d/``, ``ocdbt.process_N/``). ``_sharding`` holds each jax.Array's NamedSharding,
  ``_strings.json`` the strings; scalars are 0-d arrays.
- a `CheckpointManager` *step folder* holds ``_CHECKPOINT_METADATA`` and item folders
  (pytree, JSON and Grain iterator items: `ckpt._orbax_items`).

The result is a `Manifest` of ordinary format-v1 leaf records (scalars, strings and None
already decoded into records, empty dicts, lists and tuples as ``empty`` records, as this
library's own save records them) plus a TensorStore spec per array leaf, so restore, inspect
and convert need nothing Orbax-specific past this module. Nothing is imported from Orbax.
Every name from the checkpoint goes through the store's key checks before it is used.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import functools
import json
import logging
from typing import Any

import jax
import tensorstore as ts

from ckpt._format import (
    ATTEMPT_PREFIX,
    CLAIMS,
    COMMIT,
    ChunkLayout,
    LeafKind,
    LeafRecord,
    Manifest,
    read_object,
)
from ckpt._leaves import SUPPORTED_DTYPES, encode_value
from ckpt._tree import KeyPath, leaf_name, path_text
from ckpt.errors import (
    CorruptCheckpointError,
    NotACheckpointError,
    UncommittedCheckpointError,
    UnsupportedFormatError,
)
from ckpt.restore.boxes import chunk_sizes
from ckpt.storage import (
    DeadlineExceededError,
    ObjectNotFoundError,
    StorageError,
    Store,
    UnreadableObjectError,
    check_key,
    tensorstore_code,
)

log = logging.getLogger("ckpt.orbax")

TREE_METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
OCDBT_MANIFEST = "manifest.ocdbt"
SHARDING = "_sharding"
STRINGS = "_strings.json"
LEGACY_MSGPACK = "checkpoint"
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes under this name and renames on commit
MAX_JSON_BYTES = 256 << 20

_ARRAY_TYPES = {"jax.Array": "jax", "np.ndarray": "numpy"}
# Orbax's value types of empty containers, and what each comes back as without a target.
_EMPTY_TYPES = {"Dict": "dict", "NamedTuple": "dict", "List": "list", "Tuple": "list"}
_SCALAR_KINDS = {"b": "bool", "i": "int", "u": "int", "f": "float", "c": "complex"}
# Decoded OCDBT b-tree nodes are cached, or every array open would re-read them.
_OCDBT_CACHE = 64 << 20


@dataclasses.dataclass
class OrbaxItem:
    """An Orbax item folder opened for reading.

    Attributes:
        store: the item folder.
        manifest: its leaves as format-v1 records (``attempt`` is empty).
        specs: for each array leaf's key path, the TensorStore spec that opens it.
        context: the TensorStore context to open them in.
        layout: how it is stored, for messages and `ckpt inspect` (``OCDBT, zarr v2``).
    """

    store: Store
    manifest: Manifest
    specs: dict[KeyPath, dict[str, Any]]
    context: ts.Context
    layout: str


def _read_json(store: Store, key: str) -> Any:
    data = read_object(store, key, MAX_JSON_BYTES)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{store.describe(key)} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{store.describe(key)} nests JSON too deeply") from None


def recognise(store: Store) -> str | None:
    """What Orbax wrote at ``store``: ``"item"`` (an item folder), ``"step"`` (a
    `CheckpointManager` step folder), or None when nothing there says Orbax.

    Raises:
        NotACheckpointError: a manager root (names its newest step).
        UncommittedCheckpointError: an Orbax save still in its temporary folder.
        UnsupportedFormatError: an Orbax layout this library does not read (names the file).
    """
    if any(TMP_MARK in part for part in store.url.rstrip("/").split("/")[-2:]) and (
            store.exists(TREE_METADATA) or store.exists(STEP_METADATA)):
        raise UncommittedCheckpointError(
            f"{store.url} is an Orbax save that has not committed (its folder still has "
            f"the temporary {TMP_MARK} name): it was interrupted or is still running")
    if store.exists(TREE_METADATA):
        return "item"
    if store.exists(STEP_METADATA):
        return "step"
    if store.exists(LEGACY_MSGPACK):
        raise UnsupportedFormatError(
            f"{store.describe(LEGACY_MSGPACK)}: an Orbax checkpoint in the legacy msgpack "
            "layout (no _METADATA); load it with orbax-checkpoint and save it again")
    if store.exists(OCDBT_MANIFEST):
        raise UnsupportedFormatError(
            f"{store.describe(OCDBT_MANIFEST)} is there but {TREE_METADATA} is not: an "
            "Orbax save that never finished, or a layout this library does not read")
    # The newest folder of each naming: plain, padded (``00000020``) or prefixed
    # (``ckpt_20``); a user's ``logs_2024`` beside the steps is one that holds no step.
    newest: dict[str | None, tuple[int, str]] = {}
    for name in store.list_children():
        plain = decimal_step(name)
        prefix, step = (None, plain) if plain is not None else (orbax_step_name(name)
                                                               or (None, None))
        if step is not None and step >= newest.get(prefix, (-1, ""))[0]:
            newest[prefix] = (step, name)
    for step, name in sorted(newest.values(), reverse=True)[:3]:
        if store.exists(f"{name}/{STEP_METADATA}"):
            raise NotACheckpointError(
                f"{store.url} is an Orbax CheckpointManager root (newest step {step}): "
                f"restore or convert one step, e.g. {store.child(name).url}")
    return None


# Orbax's commit marker of a step (written last; on a local file system Orbax commits by
# renaming its temporary folder instead, and may not write it).
COMMIT_SUCCESS = "commit_success.txt"
# What a rewind record names for an Orbax step it abandons (an Orbax step has no attempts).
ORBAX_STEP = "orbax-step"


def decimal_step(name: str) -> int | None:
    """The step a folder named in plain decimal stands for (``20``; ``0``, never ``020``):
    this library's step folders, and Orbax's by default. None for any other name."""
    # ASCII digits only: str.isdigit() also accepts "²" and other digits int() rejects.
    if name.isascii() and name.isdigit() and (name == "0" or not name.startswith("0")):
        return int(name)
    return None


def orbax_step_name(name: str) -> tuple[str, int] | None:
    """The (prefix, step) an Orbax `CheckpointManager` folder name stands for, when it is
    not a plain decimal name (`decimal_step`): ``ckpt_20`` (``step_prefix="ckpt"``),
    ``00000020`` (``step_format_fixed_length=8``, prefix ``""``), ``ckpt_00020`` (both);
    None for any other name. Orbax records neither option in its files, so the name is all
    there is; whether the folder is a committed Orbax step is for `is_orbax_step` to say."""
    prefix, sep, digits = name.rpartition("_")
    if not (digits.isascii() and digits.isdigit()) or (sep and not prefix):
        return None
    if (not sep and decimal_step(digits) is not None) or TMP_MARK in name:
        return None
    return prefix, int(digits)


def holds_foreign_files(store: Store) -> bool:
    """Whether the step folder at ``store`` holds anything this library does not write
    there (Orbax's files, committed or not, or what a crashed deletion left of them): it
    never writes into such a folder. One listing."""
    return any(not (name.startswith((ATTEMPT_PREFIX, ".")) or name in (COMMIT, CLAIMS))
               for name in store.list_children())


def is_orbax_step(store: Store) -> bool:
    """Whether ``store`` is a committed Orbax `CheckpointManager` step folder (v0 or v1
    API): its ``_CHECKPOINT_METADATA`` and, except on a local file system, its commit
    marker. Called for step folders without a COMMIT of this library's: one listing of the
    folder (one request on an object store), not an existence check per file."""
    names = set(store.list_children())
    if STEP_METADATA not in names:
        return False
    return store.location.scheme == "file" or COMMIT_SUCCESS in names


def orbax_step_metrics(store: Store) -> dict[str, float]:
    """The metrics Orbax's manager recorded for the step at ``store``, from its step
    metadata and ``metrics`` item only: its items are not opened (a step of several items,
    or of a value type this library cannot read, still ranks)."""
    return step_metrics(step_metadata(store, store), store)


def orbax_step_committed_at(store: Store) -> float:
    """When Orbax committed the step at ``store`` (0.0 when it did not record it)."""
    return timestamps(step_metadata(store, store))[1]


def delete_orbax_step(store: Store) -> None:
    """Deletes the Orbax step folder at ``store``: its commit marker and step metadata
    first, so that it is no committed step from the first delete on; then the rest.
    Idempotent. A crash part-way leaves an invisible folder: a rewind's record finishes
    it; after retention or `delete` it stays (and is never written into:
    `holds_foreign_files`)."""
    store.delete(COMMIT_SUCCESS)
    store.delete(STEP_METADATA)
    for name in store.list_children():
        store.delete_prefix(name)
    store.prune()


def _key_path(entry: Any, where: str) -> KeyPath:
    keys = entry.get("key_metadata") if isinstance(entry, dict) else None
    if not isinstance(keys, list):
        raise CorruptCheckpointError(f"{where}: no key_metadata list")
    path = []
    for k in keys:
        if not (isinstance(k, dict) and isinstance(k.get("key"), str)
                and k.get("key_type") in (1, 2)):
            raise CorruptCheckpointError(f"{where}: malformed key entry {k!r:.80}")
        if k["key_type"] == 1:  # a sequence position
            if not (k["key"].isascii() and k["key"].isdigit()):
                raise CorruptCheckpointError(f"{where}: sequence key {k['key']!r:.40}")
            path.append(("index", int(k["key"])))
        else:
            path.append(("key", k["key"]))
    return tuple(path)


def _shardings(store: Store) -> dict[str, dict[str, Any]]:
    """Parameter name -> its saved NamedSharding (axis names, mesh shape, spec)."""
    if not store.exists(SHARDING):
        return {}
    raw = _read_json(store, SHARDING)
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{store.describe(SHARDING)} is not a JSON object")
    out = {}
    for encoded, text in raw.items():
        try:
            name = base64.urlsafe_b64decode(encoded.encode()).decode()
            sharding = json.loads(text)
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
            raise CorruptCheckpointError(
                f"{store.describe(SHARDING)}: entry {encoded!r:.60} does not decode") from None
        if isinstance(sharding, dict) and sharding.get("sharding_type") == "NamedSharding":
            out[name] = sharding
    return out


ARRAY_METADATAS = "array_metadatas"


def _key_impls(store: Store) -> dict[str, str]:
    """Parameter name -> the PRNG key implementation of each typed key array Orbax saved
    (its key data is the array; ``array_metadatas/process_<i>`` names the implementation).

    Every process records every array it holds, which is every array: process 0's file is
    read (else the first one listed), not one per process.
    """
    names = store.list_children(ARRAY_METADATAS)
    if not names:
        return {}
    key = f"{ARRAY_METADATAS}/{'process_0' if 'process_0' in names else names[0]}"
    raw = _read_json(store, key)
    entries = raw.get("array_metadatas") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise CorruptCheckpointError(f"{store.describe(key)} has no array_metadatas list")
    out = {}
    for entry in entries:
        meta = entry.get("array_metadata") if isinstance(entry, dict) else None
        ext = meta.get("ext_metadata") if isinstance(meta, dict) else None
        impl = ext.get("random_key_impl") if isinstance(ext, dict) else None
        name = meta.get("param_name") if isinstance(meta, dict) else None
        if impl is not None:
            if not (isinstance(impl, str) and isinstance(name, str) and impl in _KEY_IMPLS):
                raise UnsupportedFormatError(
                    f"{store.describe(key)}: array {name!r:.80} is a PRNG key of "
                    f"implementation {impl!r:.40}, which this library cannot rebuild")
            out[name] = impl
    return out


# The key implementations JAX ships (what `jax.random.key_impl` names).
_KEY_IMPLS = frozenset({"threefry2x32", "rbg", "unsafe_rbg"})


def _mesh_fields(sharding: dict[str, Any] | None, ndim: int, where: str
                 ) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None, list[Any] | None]:
    if sharding is None:
        return None, None, None
    axes: Any = sharding.get("axis_names")
    shape: Any = sharding.get("shape")
    spec: Any = sharding.get("partition_spec")
    ok = (isinstance(axes, list) and all(isinstance(a, str) for a in axes)
          and isinstance(shape, list) and len(shape) == len(axes)
          and all(isinstance(n, int) and n > 0 for n in shape)
          and isinstance(spec, list) and len(spec) <= ndim
          and all(e is None or (isinstance(e, str) and e in axes)
                  or (isinstance(e, list) and all(isinstance(a, str) and a in axes for a in e))
                  for e in spec))
    if not ok:
        raise CorruptCheckpointError(f"{where}: malformed NamedSharding {sharding!r:.200}")
    return tuple(shape), tuple(axes), list(spec)


# An array leaf being opened: (index in the records, its array name, Orbax value type,
# TensorStore's open future).
_Opening = tuple[int, str, str, Any]


def _leaf_records(item: Store, tree: dict[str, Any], meta_where: str, context: ts.Context, *,
                  ocdbt: bool, zarr3: bool, fill_missing: bool
                  ) -> tuple[list[LeafRecord], dict[KeyPath, dict[str, Any]], list[_Opening]]:
    """A record per entry of Orbax's tree metadata, in its order: values complete, arrays
    with only their path (their arrays are being opened: `_add_array_layouts`)."""
    strings: dict[str, Any] | None = None
    records: list[LeafRecord] = []
    specs: dict[KeyPath, dict[str, Any]] = {}
    opening: list[_Opening] = []
    seen: set[KeyPath] = set()
    for entry_key, entry in tree.items():
        where = f"{meta_where} entry {entry_key!r:.120}"
        path = _key_path(entry, where)
        if path in seen:
            raise CorruptCheckpointError(f"{where}: key path {path_text(path)} appears twice")
        seen.add(path)
        value_meta = entry.get("value_metadata")
        vtype = value_meta.get("value_type") if isinstance(value_meta, dict) else None
        name = ".".join(str(v) for _, v in path)
        if vtype in _EMPTY_TYPES:
            records.append(LeafRecord(path=path, kind=LeafKind.EMPTY, vtype=_EMPTY_TYPES[vtype]))
            continue
        if vtype == "None":
            records.append(LeafRecord(path=path, kind=LeafKind.NONE))
            continue
        if vtype == "string":
            if strings is None:
                strings = _read_json(item, STRINGS) if item.exists(STRINGS) else {}
            text = strings.get(name) if isinstance(strings, dict) else None
            if not isinstance(text, str):
                raise CorruptCheckpointError(
                    f"{item.describe(STRINGS)} holds no string for leaf {path_text(path)}")
            records.append(LeafRecord(path=path, kind=LeafKind.VALUE, vtype="str", value=text))
            continue
        if vtype not in _ARRAY_TYPES and vtype != "scalar":
            raise UnsupportedFormatError(
                f"{where}: leaf {path_text(path)} has Orbax value type {vtype!r:.60}, which this "
                "library cannot read (it reads jax.Array, np.ndarray, scalar, string, None)")
        spec = _array_spec(item, name, ocdbt=ocdbt, zarr3=zarr3, fill_missing=fill_missing)
        opening.append((len(records), name, vtype, ts.open(spec, context=context)))
        records.append(LeafRecord(path=path, kind=LeafKind.ARRAY,
                                  source=_ARRAY_TYPES.get(vtype, "numpy"), name=leaf_name(path)))
        specs[path] = spec
    return records, specs, opening


@functools.cache
def _key_data_dims(impl: str) -> int:
    """The trailing dimensions a key of ``impl`` adds to its key data (1 for the
    implementations JAX has); 0 for one this JAX does not know (refused elsewhere, naming
    the leaf)."""
    try:
        return len(jax.eval_shape(
            lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape)
    except Exception:
        return 0


def _add_array_layouts(item: Store, records: list[LeafRecord], opening: list[_Opening],
                       shardings: dict[str, Any],
                       key_impls: dict[str, str]) -> list[tuple[int, Any]]:
    """Completes each opened array's record (shape, dtype, chunk grid, saved sharding, PRNG
    key implementation) in place; returns the reads started for the scalars Orbax stores
    as 0-d arrays."""
    scalars: list[tuple[int, Any]] = []  # (index in records, read future)
    for index, name, vtype, fut in opening:
        rec = records[index]
        what = f"leaf {path_text(rec.path)} of {item.url}"
        try:
            arr = item.wait(fut, f"opening {what}")
        except DeadlineExceededError:
            raise
        except Exception as exc:
            if tensorstore_code(exc) in ("NOT_FOUND", "FAILED_PRECONDITION", "DATA_LOSS"):
                raise CorruptCheckpointError(f"{what}: its array is missing or unreadable: "
                                             f"{exc}") from None
            raise StorageError(errno.EIO, f"{what}: opening its array failed: {exc}") from None
        shape, dtype = tuple(arr.shape), arr.dtype.name
        if dtype not in SUPPORTED_DTYPES:
            raise UnsupportedFormatError(
                f"{what} has dtype {dtype} (zarr metadata of {item.describe(name)}), "
                "which this library cannot read")
        chunk = arr.chunk_layout.read_chunk.shape
        chunk_shape = tuple(chunk) if chunk is not None else shape  # None for 0-d
        itemsize = arr.dtype.numpy_dtype.itemsize
        # Orbax records no writers or checksums: only the grid and each chunk's size.
        grid = ChunkLayout(chunk_shape, nbytes=tuple(
            n * itemsize for n in chunk_sizes(shape, chunk_shape)))
        rec = records[index] = dataclasses.replace(rec, shape=shape, dtype=dtype, layout=grid,
                                                   prng_impl=key_impls.get(name, ""))
        if vtype == "scalar":
            scalars.append((index, arr.read()))
        elif rec.source == "jax":
            mesh_shape, mesh_axes, saved_spec = _mesh_fields(
                shardings.get(name), len(shape), item.describe(SHARDING))
            if rec.prng_impl and saved_spec is not None:
                # Orbax records the sharding of a key array's key data (its trailing
                # implementation dimensions included); the format keeps the key array's
                # own PartitionSpec (docs/format.md), one entry per key dimension.
                saved_spec = saved_spec[:max(0, len(shape) - _key_data_dims(rec.prng_impl))]
            records[index] = dataclasses.replace(rec, mesh_shape=mesh_shape,
                                                 mesh_axes=mesh_axes, spec=saved_spec)
    return scalars


def _add_scalar_values(item: Store, records: list[LeafRecord],
                       specs: dict[KeyPath, dict[str, Any]],
                       scalars: list[tuple[int, Any]]) -> None:
    """Turns each scalar's record into a value leaf holding what was read, in place."""
    for index, fut in scalars:
        rec = records[index]
        try:
            value = item.wait(fut, f"reading leaf {path_text(rec.path)}")
        except DeadlineExceededError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(
                f"leaf {path_text(rec.path)} of {item.url}: cannot read it: {exc}") from None
        py = value.item() if value.ndim == 0 else None
        vkind = _SCALAR_KINDS.get(value.dtype.kind)
        if py is None or vkind is None:
            raise UnsupportedFormatError(f"leaf {path_text(rec.path)} of {item.url}: a scalar "
                                         f"stored as {value.dtype}{list(value.shape)}")
        specs.pop(rec.path)
        records[index] = LeafRecord(path=rec.path, kind=LeafKind.VALUE, source=rec.source,
                                    name=rec.name, vtype=vkind, value=encode_value(py))


def new_context(store: Store) -> ts.Context:
    """The TensorStore context to open the arrays of one Orbax checkpoint (every item of a
    step) in: the store's, plus a cache of decoded OCDBT nodes."""
    return ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_CACHE}},
                      parent=store.tensorstore_context())


def open_pytree_item(item: Store, given: Store, context: ts.Context) -> OrbaxItem:
    """Opens the Orbax pytree item folder at ``item`` (``given`` is what the caller named:
    the item itself, or the step folder holding it, whose metadata then applies).

    Called through `ckpt._orbax_items.open_orbax` on any process; reads ``_METADATA``,
    ``_sharding``, ``_strings.json`` and each array's zarr metadata (and its value, for
    scalars), never array chunks.

    Raises:
        UnsupportedFormatError: a value type or dtype this library cannot read; the message
            names the leaf and the file that shows it.
        CorruptCheckpointError: a metadata file that does not parse, or an array missing.
    """
    try:
        # TensorStore opens the array and OCDBT files here itself: a FIFO or device among
        # them would block it forever (one listing of the item folder).
        item.check_plain_files("")
    except UnreadableObjectError as exc:
        raise CorruptCheckpointError(str(exc)) from None
    meta_where = item.describe(TREE_METADATA)
    meta = _read_json(item, TREE_METADATA)
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise CorruptCheckpointError(f"{meta_where} has no tree_metadata object")
    ocdbt = item.exists(OCDBT_MANIFEST)
    zarr3 = bool(meta.get("use_zarr3", False))
    # Without this flag (older Orbax), chunks equal to the fill value were not written.
    fill_missing = not meta.get("store_array_data_equal_to_fill_value", False)
    records, specs, opening = _leaf_records(item, tree, meta_where, context, ocdbt=ocdbt,
                                            zarr3=zarr3, fill_missing=fill_missing)
    scalars = _add_array_layouts(item, records, opening, _shardings(item), _key_impls(item))
    _add_scalar_values(item, records, specs, scalars)
    step = step_metadata(item, given)
    created, committed = timestamps(step)
    # The item's own custom metadata, else the step's (CheckpointManager.save's, which
    # MaxText checks on load).
    custom = meta.get("custom_metadata")
    if custom in ({}, None):
        custom = step.get("custom_metadata")
    layout = f"{'OCDBT' if ocdbt else 'one folder per array'}, zarr v{3 if zarr3 else 2}"
    manifest = Manifest(attempt="", process_count=_process_count(item),
                        created_at=created, committed_at=committed,
                        versions={"writer": "orbax-checkpoint"},
                        metadata=custom if custom not in ({}, None) else None, leaves=records,
                        metrics=step_metrics(step, given))
    return OrbaxItem(item, manifest, specs, context, layout)


def _array_spec(item: Store, name: str, *, ocdbt: bool, zarr3: bool,
                fill_missing: bool) -> dict[str, Any]:
    if ocdbt:
        # Names inside the OCDBT database are keys of that database, but they are checked
        # like any key so that no name from a checkpoint is used unchecked.
        kvstore: dict[str, Any] = {"driver": "ocdbt", "base": item.kvstore_spec(),
                                   "path": check_key(name),
                                   "cache_pool": "cache_pool#ocdbt"}
    else:
        kvstore = item.kvstore_spec(name)
    return {"driver": "zarr3" if zarr3 else "zarr", "kvstore": kvstore, "open": True,
            "recheck_cached_data": False, "recheck_cached_metadata": False,
            "fill_missing_data_reads": fill_missing}


def step_metadata(item: Store, given: Store) -> dict[str, Any]:
    """``_CHECKPOINT_METADATA`` of the item (a `StandardCheckpointer` folder) or of the step
    folder given (a manager step); empty when neither has one."""
    for store in (item, given):
        try:
            meta = _read_json(store, STEP_METADATA)
        except ObjectNotFoundError:
            continue
        if isinstance(meta, dict):
            return meta
    return {}


def timestamps(step: dict[str, Any]) -> tuple[float, float]:
    init, done = step.get("init_timestamp_nsecs"), step.get("commit_timestamp_nsecs")
    if isinstance(init, int) and isinstance(done, int):
        return init / 1e9, done / 1e9
    return 0.0, 0.0


# The item a CheckpointManager writes the ``metrics=`` of a save into (``metrics/metrics``).
METRICS_ITEM = "metrics"


def step_metrics(step: dict[str, Any], given: Store) -> dict[str, float]:
    """The metrics `CheckpointManager.save(..., metrics=)` recorded, from the step's
    ``metrics`` item (when ``given`` is the step folder) or its metadata: the numbers among
    them (Orbax accepts any tree; only name -> number pairs rank and show here)."""
    metrics = step.get("metrics")
    handlers = step.get("item_handlers")
    if isinstance(handlers, dict) and METRICS_ITEM in handlers:
        # Given the item folder, the step's metrics are out of reach.
        with contextlib.suppress(ObjectNotFoundError):
            metrics = _read_json(given, f"{METRICS_ITEM}/{METRICS_ITEM}")
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for k, v in metrics.items():
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                out[k] = float(v)
            except OverflowError:  # an integer beyond any float: no number to rank by
                continue
    return out


def _process_count(item: Store) -> int:
    """How many processes wrote the item: each leaves ``array_metadatas/process_N`` (and,
    with OCDBT, ``ocdbt.process_N/``)."""
    found = [c for c in item.child(ARRAY_METADATAS).list() if c.startswith("process_")] \
        or [c for c in item.list_children() if c.startswith("ocdbt.process_")]
    return max(1, len(found))
