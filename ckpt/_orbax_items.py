"""The items of an orbax-checkpoint step, read whole or one at a time.

Called by `ckpt._reader.open_readable` when a URL holds no COMMIT, on every process that
restores, inspects or converts. A `CheckpointManager` step folder (``_CHECKPOINT_METADATA``,
v0 and v1 APIs alike) holds one folder per item, each recognised from its files:

- a *pytree item* (``_METADATA``): arrays, scalars and strings (`ckpt._orbax`);
- a *JSON item* (one JSON file: ``metadata`` from `args.JsonSave`, ``data.json`` from the
  v1 API's JSON handler, ``metrics`` from the manager's own metrics item): its value, as a
  tree of value leaves;
- a *Grain iterator item* (``process_<i>-of-<n>.json``, one per process, from Grain's
  checkpoint handler): one per-process leaf (vtype ``json``) holding each process's state.

A step of one item reads as that item; a step of several as ``{item name: item}``; the
manager's own ``metrics`` item is the step's metrics (`CheckpointInfo.metrics`), not an item
of the tree, unless asked for by name. ``item=`` picks one item (on an item folder, or on one
of this library's checkpoints, one top-level key). An item of any other kind is an
`UnsupportedFormatError` naming it whenever it would be read: never left out in silence.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Collection
from typing import Any

import jax

from ckpt._format import LeafKind, LeafRecord, Manifest, read_object
from ckpt._leaves import classify
from ckpt._orbax import (
    COMMIT_SUCCESS,
    MAX_JSON_BYTES,
    METRICS_ITEM,
    STEP_METADATA,
    TREE_METADATA,
    OrbaxItem,
    new_context,
    open_pytree_item,
    recognise,
    step_metadata,
    step_metrics,
    timestamps,
)
from ckpt._tree import KeyPath, flatten, leaf_name
from ckpt.errors import (
    CorruptCheckpointError,
    MissingLeafError,
    NotACheckpointError,
    UnsupportedFormatError,
    UnsupportedLeafError,
)
from ckpt.storage import InvalidKeyError, Store, check_key

# Grain's per-process state files; indices in ASCII without leading zeros, as Grain writes them.
_GRAIN_STATE = re.compile(r"process_(0|[1-9][0-9]*)-of-([1-9][0-9]*)\.json", re.ASCII)
# More processes than any job has: a file name claiming more is damage, and would make a
# reader build per-process lists of that length.
_MAX_PROCESSES = 1 << 20
# Iterator states are small; this bounds what an edited file can make a reader hold.
_MAX_STATE_BYTES = 64 << 20


def open_orbax(store: Store, item: str | None = None,
               wanted: Collection[str] | None = None) -> OrbaxItem | None:
    """Opens what Orbax wrote at ``store``: an item folder, or a step folder's items.

    Args:
        item: None for everything (a step of several items as ``{name: item}``); else one
            step item by name, or, on an item folder, one top-level key of its tree.
        wanted: the top-level keys of a restore's target: of a step of several items, only
            the items it names are opened (one it leaves out, unreadable or damaged, does
            not stop the restore); None, or naming none of them, opens every item.

    Returns:
        None when nothing at ``store`` says Orbax.

    Raises:
        MissingLeafError: no item (or key) ``item``; the message lists what there is.
        UnsupportedFormatError: an item this library cannot read, named, when it is read.
        The errors of `ckpt._orbax.recognise` and `ckpt._orbax.open_pytree_item`.
    """
    found = recognise(store)
    if found is None:
        return None
    context = new_context(store)
    if found == "item":
        opened = open_pytree_item(store, store, context)
        return opened if item is None else select_item(opened, item)
    step = _Step(store, context, step_metadata(store, store))
    names = step_items(store, step.meta)
    if item is not None:
        if item not in names and not (item == METRICS_ITEM and _is_metrics_item(store)):
            raise MissingLeafError(f"{store.url} has no item {item!r} (its items: "
                                   f"{', '.join(names) or 'none'})")
        return _open_item(step, item, prefix=())
    if not names:
        raise NotACheckpointError(f"{store.describe(STEP_METADATA)} marks an Orbax step, but "
                                  "no item folder in it holds anything this library reads")
    if len(names) == 1:
        return _open_item(step, names[0], prefix=())
    chosen = [n for n in names if wanted is not None and n in wanted] or names
    return _merge(step, [_open_item(step, n, prefix=(("key", n),)) for n in chosen])


@dataclasses.dataclass
class _Step:
    """A step folder being opened, with its ``_CHECKPOINT_METADATA`` read once for all its
    items (and its metrics, read when first asked for)."""

    store: Store
    context: Any
    meta: dict[str, Any]

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        return step_metrics(self.meta, self.store)

    def manifest(self, leaves: list[LeafRecord], process_count: int,
                 metadata: Any = None) -> Manifest:
        """A manifest of ``leaves`` with the step's times, metrics and custom metadata (else
        ``metadata``)."""
        created, committed = timestamps(self.meta)
        return Manifest(attempt="", process_count=process_count, created_at=created,
                        committed_at=committed, versions={"writer": "orbax-checkpoint"},
                        metadata=self.meta.get("custom_metadata") or metadata, leaves=leaves,
                        metrics=self.metrics)


def step_items(step: Store, meta: dict[str, Any]) -> list[str]:
    """The names of the items of the Orbax step at ``step``, sorted, without the manager's
    own metrics item: those its step metadata ``meta`` lists (``item_handlers``), else its
    folders."""
    handlers = meta.get("item_handlers")
    if isinstance(handlers, dict) and handlers:
        names = list(handlers)
    else:  # the step's folders (an object of that name is a file, not an item)
        names = [c for c in step.list_children() if c not in (STEP_METADATA, COMMIT_SUCCESS)
                 and not c.startswith(".") and not step.exists(c)]
    out = []
    for name in names:
        try:
            check_key(name)
        except InvalidKeyError:
            raise CorruptCheckpointError(f"{step.describe(STEP_METADATA)} names an item "
                                         f"{name!r:.80} that is not a folder name") from None
        if "/" in name or name in (STEP_METADATA, COMMIT_SUCCESS):
            raise CorruptCheckpointError(f"{step.describe(STEP_METADATA)} names an item "
                                         f"{name!r:.80} that is not a folder name")
        if not (name == METRICS_ITEM and _is_metrics_item(step)):
            out.append(name)
    return sorted(out)


def _is_metrics_item(step: Store) -> bool:
    return step.exists(f"{METRICS_ITEM}/{METRICS_ITEM}")


def select_item(opened: OrbaxItem, item: str) -> OrbaxItem:
    """The part of an opened item folder under its top-level key ``item``, as its own tree."""
    head = ("key", item)
    specs = {p[1:]: s for p, s in opened.specs.items() if p[:1] == (head,)}
    return dataclasses.replace(opened, manifest=opened.manifest.subtree(item, opened.store.url),
                               specs=specs)


def _open_item(step: _Step, name: str, prefix: KeyPath) -> OrbaxItem:
    """Opens item ``name`` of ``step``, its leaves' paths under ``prefix``."""
    folder = step.store.child(name)
    if folder.exists(TREE_METADATA):
        opened = open_pytree_item(folder, step.store, step.context)
    else:
        opened = _open_file_item(step, name, folder)
    if not prefix:
        return opened
    # Array names follow the key path (`leaf_name`): two items holding the same keys
    # (params and ema_params) must not share an array folder once converted.
    leaves = [dataclasses.replace(r, path=prefix + r.path,
                                  name=leaf_name(prefix + r.path) if r.name else "")
              for r in opened.manifest.leaves]
    return dataclasses.replace(
        opened, manifest=dataclasses.replace(opened.manifest, leaves=leaves),
        specs={prefix + p: s for p, s in opened.specs.items()})


def _open_file_item(step: _Step, name: str, folder: Store) -> OrbaxItem:
    """A JSON item or a Grain iterator item, recognised from its files."""
    files = [f for f in folder.list() if f != COMMIT_SUCCESS]
    if not files:
        raise CorruptCheckpointError(f"item {name!r:.80} of the Orbax step {step.store.url} is "
                                     "listed in its metadata, but its folder holds nothing")
    grain = [_GRAIN_STATE.fullmatch(f) for f in files]
    if all(grain):
        records = [_grain_record(folder, [m for m in grain if m])]
        layout = "Grain iterator state"
    elif any(f.startswith("process_") and f.endswith(".json") for f in files):
        raise CorruptCheckpointError(
            f"{folder.url} looks like a Grain iterator item, but not every file is named "
            f"process_<i>-of-<n>.json: {', '.join(files[:4])[:300]}")
    elif len(files) == 1 and "/" not in files[0]:
        records = _json_records(folder, files[0])
        layout = "JSON"
    else:
        handler = step.meta.get("item_handlers") or {}
        kind = handler.get(name) if isinstance(handler, dict) else None
        shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "") or "nothing"
        raise UnsupportedFormatError(
            f"item {name!r:.80} of the Orbax step {step.store.url} (written by "
            f"{kind or 'an unnamed handler'}; it holds {shown}) is not one this library "
            "reads (pytree, JSON or Grain iterator items); restore another with item=")
    count = len(records[0].value) if records[0].kind == LeafKind.PER_PROCESS else 1
    return OrbaxItem(folder, step.manifest(records, count), {}, step.context, layout)


def _read_json(folder: Store, key: str, limit: int = MAX_JSON_BYTES) -> Any:
    data = read_object(folder, key, limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UnsupportedFormatError(f"{folder.describe(key)} is not a JSON item this library "
                                     f"reads: {exc}"[:500]) from None


# Deeper JSON than any config holds; restore rebuilds trees recursively.
_MAX_JSON_DEPTH = 100


def _depth(value: Any) -> int:
    """How deeply ``value`` nests, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def _json_records(folder: Store, key: str) -> list[LeafRecord]:
    """The value leaves of the JSON item file ``key``."""
    value = _read_json(folder, key)
    where = folder.describe(key)
    if _depth(value) > _MAX_JSON_DEPTH:
        raise UnsupportedFormatError(f"{where} nests deeper than {_MAX_JSON_DEPTH} levels")
    try:
        return [classify(path, leaf, 1) for path, leaf in flatten(value)[0]]
    except UnsupportedLeafError as exc:  # a lone surrogate in a key or a string, say
        raise UnsupportedFormatError(f"{where}: {exc}"[:500]) from None


def _grain_record(folder: Store, found: list[re.Match[str]]) -> LeafRecord:
    """The per-process leaf of a Grain iterator item: every process's JSON text when one
    process reads (a conversion, an inspection), else this process's own only (a restart of
    a job of N processes, each reading one file, not N)."""
    counts = {int(m.group(2)) for m in found}
    n = max(counts)
    indices = {int(m.group(1)) for m in found}
    # Sizes are checked before any per-process list is built: a name may claim any count.
    if len(counts) != 1 or n > _MAX_PROCESSES or len(found) != n or max(indices) >= n \
            or len(indices) != n:
        shown = ", ".join(sorted(m.group(0) for m in found)[:4])
        raise CorruptCheckpointError(
            f"{folder.url} is a Grain iterator item whose per-process files do not make one "
            f"whole job ({len(found)} files: {shown}{', ...' if len(found) > 4 else ''}; "
            f"missing processes: {sorted(set(range(min(n, 10))) - indices)[:10] or 'none'})")
    me, count = jax.process_index(), jax.process_count()
    wanted = range(n) if count == 1 else [me] if count == n else []
    names = {int(m.group(1)): m.group(0) for m in found}
    texts: list[Any] = [None] * n
    for i in wanted:
        data = read_object(folder, names[i], _MAX_STATE_BYTES)
        try:
            texts[i] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptCheckpointError(
                f"{folder.describe(names[i])} is not UTF-8 text") from None
    return LeafRecord(path=(), kind=LeafKind.PER_PROCESS, vtype="json", value=texts)


def _merge(step: _Step, items: list[OrbaxItem]) -> OrbaxItem:
    """The items of one step as one tree under their names."""
    custom = next((i.manifest.metadata for i in items if i.manifest.metadata), None)
    manifest = step.manifest([r for i in items for r in i.manifest.leaves],
                             max(i.manifest.process_count for i in items), custom)
    specs = {p: s for i in items for p, s in i.specs.items()}
    layout = f"{len(items)} items: " + ", ".join(
        f"{i.store.url.rstrip('/').rsplit('/', 1)[-1]} ({i.layout})" for i in items)
    return OrbaxItem(step.store, manifest, specs, step.context, layout)
