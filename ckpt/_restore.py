"""Restoring a committed checkpoint onto a target: matching, reading, building arrays.

The checkpoint is opened through `ckpt._reader` (this library's format or Orbax's, the same
interface). `restore` matches the target tree to the manifest by key path, plans which boxes
each of this process's devices needs, reads them through `ckpt.restore.read_arrays` and
assembles arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from ckpt._format import LeafKind, LeafRecord, Manifest, check_tree
from ckpt._leaves import (
    PerProcess,
    decode_inline,
    decode_value,
    dtype_from_name,
    empty_record,
    is_array_like,
    is_stateful,
    is_typed_key,
    saved_state,
)
from ckpt._names import NameRules, NamesLike
from ckpt._reader import Readable, open_readable
from ckpt._tree import (
    KeyPath,
    flatten,
    gc_paused,
    is_empty_container,
    nest,
    path_text,
    unflatten,
)
from ckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DtypeMismatchError,
    InvalidArgumentError,
    MeshMismatchError,
    MissingLeafError,
    ShapeMismatchError,
    TargetMismatchError,
    UnshardedTargetWarning,
)
from ckpt.restore import ArrayReadJob, aligned_empty, read_arrays
from ckpt.restore.boxes import Box, box_of_index, box_size, full_box, to_slices
from ckpt.storage import (
    Deadline,
    DeadlineStore,
    Store,
    StoreLike,
    open_store,
)

log = logging.getLogger("ckpt.restore")


@dataclasses.dataclass
class _Want:
    """How one saved leaf is to be restored."""

    record: LeafRecord
    dtype: np.dtype[Any] | None = None      # None: the saved dtype
    sharding: Any = None                     # None: a host numpy array
    uncommitted: bool = False                # a jax.Array JAX may move (like the target's)
    key: bool = False                        # rebuild a typed PRNG key array
    key_sharding: Any = None                 # ... placed with this sharding
    defaulted: bool = False                  # the target had no placement: default device
    keep: Any = None                         # an empty container of the target, returned
    target: Any = None                       # a per-process leaf's target leaf
    every: bool = False                      # ... without one, saved by another process
                                             # count: every process's value, by index


def _cast_check(rec: LeafRecord, saved: np.dtype[Any], dtype: np.dtype[Any]) -> str | None:
    if dtype == saved or np.can_cast(saved, dtype, casting="same_kind"):
        return None
    return f"{path_text(rec.path)}: saved {saved}, target {dtype}"


def _spec_sharding(rec: LeafRecord, mesh: jax.sharding.Mesh) -> tuple[Any, str | None]:
    """The sharding of ``rec``'s saved PartitionSpec on ``mesh``, or an error line."""
    spec = rec.spec_entries()
    if rec.prng_impl and len(spec) >= len(rec.shape) > 0:
        # A typed key's spec is the key array's own (one entry per key dimension); an
        # Orbax conversion of an earlier release kept its key data's, one entry longer.
        spec = spec[:len(rec.shape) - 1]
    axes = [a for entry in spec if entry is not None
            for a in ([entry] if isinstance(entry, str) else entry)]
    lacking = [a for a in axes if a not in mesh.axis_names]
    if lacking:
        return None, (f"{path_text(rec.path)} uses axes {lacking} that the mesh "
                      f"{dict(mesh.shape)} lacks")
    # PartitionSpec's constructor is unannotated in JAX.
    partition = jax.sharding.PartitionSpec(*spec)  # type: ignore[no-untyped-call]
    return jax.sharding.NamedSharding(mesh, partition), None


_NUMBERS = ("int", "float", "bool", "complex")


def _target_placement(want: _Want, t: Any) -> None:
    """Where an array target puts the restored leaf: its sharding (already in
    ``want.sharding`` when it has one), host numpy for a numpy target, or uncommitted."""
    if want.sharding is None:
        want.sharding = getattr(t, "sharding", None)
    if isinstance(t, np.ndarray):
        want.sharding = None
    elif isinstance(t, jax.Array) and not getattr(t, "_committed", True):
        # An array created without a placement (e.g. optax's step count) may be moved
        # next to committed arrays by jit; restoring it committed would forbid that.
        want.sharding, want.uncommitted = None, True
    elif want.sharding is None and isinstance(t, jax.ShapeDtypeStruct):
        # A target that says "an array" but not where (jax.eval_shape makes these): an
        # array on this process's first device, said once (`_warn_defaulted`).
        want.sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        want.defaulted = True


def _warn_defaulted(wants: list[_Want], what: str) -> None:
    names = [path_text(w.record.path) for w in wants if w.defaulted]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"restoring {what}: {len(names)} target leaves have no sharding (as jax.eval_shape "
            f"makes them): {shown}; restored as jax.Arrays on {jax.local_devices()[0]} (give "
            "the target shardings, or pass mesh=, to place them)", UnshardedTargetWarning,
            stacklevel=_user_frame())


def _user_frame() -> int:
    """The ``stacklevel`` of the first caller outside this package, so that a warning
    names the user's line whichever entry point (`ckpt.restore`, a manager) it came in by."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _loose(path: KeyPath) -> KeyPath:
    """A key path as Orbax records it: attribute names and dict keys alike, as strings."""
    return tuple(("index", v) if k == "index" else ("key", str(v)) for k, v in path)


class _Mismatches:
    """What is wrong between a target and a checkpoint, by kind, reported all at once."""

    _KINDS = ((TargetMismatchError, "kind"), (ShapeMismatchError, "shape"),
              (DtypeMismatchError, "dtype"), (MeshMismatchError, "mesh"),
              (TargetMismatchError, "process count"))

    def __init__(self) -> None:
        self.found: dict[str, list[str]] = {title: [] for _, title in self._KINDS}

    def add(self, title: str, error: str | None) -> None:
        if error:
            self.found[title].append(error)

    def raise_any(self, what: str) -> None:
        for cls, title in self._KINDS:
            if self.found[title]:
                raise cls(f"target {title} mismatch against {what}: "
                          + "; ".join(self.found[title]))


def _saved_leaves(manifest: Manifest) -> Callable[[KeyPath], LeafRecord | None]:
    """Finds the saved leaf of a target path: the same path, else the one saved leaf equal
    to it under `_loose` (Orbax, and checkpoints converted from Orbax, record namedtuple
    fields and integer dict keys as string dict keys)."""
    by_path: dict[KeyPath, LeafRecord] = {rec.path: rec for rec in manifest.leaves}
    by_loose: dict[KeyPath, list[LeafRecord]] = {}
    for rec in manifest.leaves:
        by_loose.setdefault(_loose(rec.path), []).append(rec)

    def lookup(path: KeyPath) -> LeafRecord | None:
        found = by_path.get(path)
        if found is None and len(by_loose.get(_loose(path), ())) == 1:
            found = by_loose[_loose(path)][0]
        return found

    return lookup


def _want_value(want: _Want, path: KeyPath, t: Any, what: str, bad: _Mismatches) -> None:
    """A saved value or None, against its target (which may ask for a 0-d array)."""
    rec = want.record
    if t is None or not is_array_like(t):
        return
    if rec.kind == LeafKind.VALUE and rec.vtype in _NUMBERS and tuple(t.shape) == ():
        # A Python number under a 0-d array target (what `jax.eval_shape` makes of a step
        # counter) restores as that array.
        want.dtype = np.dtype(t.dtype)
        value = decode_value(rec, f"{what} leaf {path_text(path)}")
        bad.add("dtype", _cast_check(rec, np.asarray(value).dtype, want.dtype))
        _target_placement(want, t)
    else:
        bad.add("kind", f"{path_text(path)}: saved a {rec.kind}, target is an array")


def _want_as_saved(want: _Want, mesh: Any, bad: _Mismatches) -> None:
    """A saved array with no target leaf: as saved, onto ``mesh`` with its saved spec."""
    rec = want.record
    if mesh is None or rec.source != "jax":
        return
    sharding, err = _spec_sharding(rec, mesh)
    bad.add("mesh", err)
    if err:
        return
    if rec.prng_impl:
        want.key, want.key_sharding = True, sharding
    else:
        want.sharding = sharding


def _want_key(want: _Want, path: KeyPath, t: Any, bad: _Mismatches) -> None:
    """A typed PRNG key target: the saved key data, with the saved implementation."""
    rec = want.record
    key_shape = rec.shape[:len(t.shape)]
    if not rec.prng_impl:
        bad.add("kind", f"{path_text(path)}: target is a PRNG key, saved {rec.dtype}")
    elif tuple(t.shape) != key_shape:
        bad.add("shape", f"{path_text(path)}: saved keys {list(key_shape)}, target "
                         f"{list(t.shape)}")
    want.key, want.key_sharding = True, getattr(t, "sharding", None)


def _want_per_process(want: _Want, path: KeyPath, t: Any, bad: _Mismatches) -> None:
    """A per-process leaf: this process's saved value, which needs the saved process count."""
    saved, now = len(want.record.value), jax.process_count()
    if t is None and saved != now:
        want.every = True  # no target (inspection, a notebook): every process's value
    elif saved != now:
        bad.add("process count", f"{path_text(path)} holds the values of {saved} processes, "
                                 f"and {now} are restoring (leave it out of the target to "
                                 f"restore the rest)")
    elif is_array_like(t) and not is_stateful(t):
        bad.add("kind", f"{path_text(path)}: saved a per-process value, target is an array")
    want.target = t


def _per_process_value(want: _Want, setters: list[tuple[Any, Any]]) -> Any:
    """What a per-process leaf restores as: the target object itself, its state to be set
    once the whole restore succeeded (``setters``); a `PerProcess` for a `PerProcess` target
    (or none, if one was saved); else the plain value. Without a target, in a job of
    another size than the one that saved it: a list of every process's value, by index."""
    rec, t = want.record, want.target
    if want.every:
        return [saved_state(rec, p, None, path_text(rec.path)) for p in range(len(rec.value))]
    value = saved_state(rec, jax.process_index(), t, path_text(rec.path))
    if is_stateful(t):
        setters.append((t, value))
        return t
    if isinstance(t, PerProcess) or (t is None and rec.vtype == "value"):
        return PerProcess(value)
    return value


def _want_array(want: _Want, path: KeyPath, t: Any, saved: np.dtype[Any], mesh: Any,
                bad: _Mismatches) -> None:
    """A saved array against an array target: its shape, dtype (cast) and placement."""
    rec = want.record
    if not is_array_like(t):
        bad.add("kind", f"{path_text(path)}: saved an array, target is {type(t).__name__}")
        return
    if tuple(t.shape) != rec.shape:
        bad.add("shape", f"{path_text(path)}: saved {list(rec.shape)}, target {list(t.shape)}")
    want.dtype = np.dtype(t.dtype)
    bad.add("dtype", _cast_check(rec, saved, want.dtype))
    want.sharding = getattr(t, "sharding", None)
    if want.sharding is None and mesh is not None and rec.source == "jax":
        want.sharding, err = _spec_sharding(rec, mesh)
        bad.add("mesh", err)
    _target_placement(want, t)


def _held_instead(missing: list[KeyPath], saved: list[KeyPath], shown: int = 6) -> str:
    """What the checkpoint holds where the target's missing leaves would be: under the
    longest key-path prefix each shares with a saved leaf (a changed optimizer chain, a
    renamed layer), the saved leaves there, so that the difference is plain. One pass over
    the saved paths, then a walk up each missing path (models have tens of thousands)."""
    under: dict[KeyPath, list[KeyPath]] = {}
    count: dict[KeyPath, int] = {}
    for s in saved:
        for depth in range(len(s) + 1):
            count[s[:depth]] = count.get(s[:depth], 0) + 1
            held = under.setdefault(s[:depth], [])
            if len(held) < shown:
                held.append(s)
    leaves = set(saved)
    places: dict[KeyPath, None] = {}
    for path in missing:
        depth = next(d for d in range(len(path), -1, -1) if path[:d] in under or d == 0)
        if depth and path[:depth] in leaves:  # a saved leaf where the target has a subtree
            depth -= 1
        places.setdefault(path[:depth], None)
    parts = []
    for prefix in places:
        where = f"under {path_text(prefix)}" if prefix else "at the top"
        held = under.get(prefix, [])
        more = f" and {count[prefix] - len(held)} more" if count.get(prefix, 0) > len(held) \
            else ""
        parts.append(f"{where}: {', '.join(map(path_text, held)) or 'nothing'}{more}")
    return "; the checkpoint holds " + "; ".join(parts)


def _match(manifest: Manifest, target: Any, mesh: Any, what: str) -> tuple[list[_Want], Any]:
    """Pairs target leaves with saved leaves (`_saved_leaves`) and says how each is
    restored; raises listing every mismatch at once."""
    lookup = _saved_leaves(manifest)
    if target is None:
        check_tree(manifest.leaves, what)  # nested dicts and lists are built from the paths
        pairs: list[tuple[KeyPath, Any]] = [(rec.path, None) for rec in manifest.leaves]
        treedef = None
    else:
        pairs, treedef = flatten(target)
    # An empty container of the target needs nothing saved (checkpoints from before empty
    # containers were recorded, Orbax's): it comes back as it is.
    records = [lookup(path) or (empty_record(path, t) if is_empty_container(t) else None)
               for path, t in pairs]
    missing = [path for (path, _), rec in zip(pairs, records, strict=True) if rec is None]
    if missing:
        raise MissingLeafError(f"target leaves absent from {what}: "
                               f"{', '.join(map(path_text, missing))}"
                               + _held_instead(missing, [r.path for r in manifest.leaves]))
    wants: list[_Want] = []
    bad = _Mismatches()
    for (path, t), rec in zip(pairs, records, strict=True):
        assert rec is not None
        want = _Want(rec)
        wants.append(want)
        if rec.kind == LeafKind.PER_PROCESS:
            _want_per_process(want, path, t, bad)
            continue
        if is_stateful(t):
            # Its set_state would never be called: the object would silently keep its
            # own state while the restore reports success.
            bad.add("kind", f"{path_text(path)}: the target is an object with get_state/"
                            f"set_state (a data iterator), but the checkpoint holds a "
                            f"{rec.kind.value} there, not a saved state")
            continue
        if is_empty_container(t) and rec.kind in (LeafKind.EMPTY, LeafKind.NONE):
            want.keep = t  # Orbax records some empty containers (optax's EmptyState) as None
            continue
        if rec.kind in (LeafKind.VALUE, LeafKind.NONE):
            _want_value(want, path, t, what, bad)
            continue
        if rec.kind == LeafKind.EMPTY:
            if t is not None:
                bad.add("kind", f"{path_text(path)}: saved an empty {rec.vtype}, target is "
                                f"{type(t).__name__}")
            continue
        saved = dtype_from_name(rec.dtype, f"{what} leaf {path_text(path)}")
        if t is None:
            _want_as_saved(want, mesh, bad)
        elif is_typed_key(t):
            _want_key(want, path, t, bad)
        else:
            _want_array(want, path, t, saved, mesh, bad)
    bad.raise_any(what)
    return wants, treedef


@functools.lru_cache(maxsize=256)
def _distinct_boxes(sharding: Any, shape: tuple[int, ...]) -> list[Box]:
    """The distinct boxes this process's devices hold of ``shape`` under ``sharding``:
    asked of JAX once for the many leaves that share a sharding and shape."""
    devmap = sharding.addressable_devices_indices_map(shape)
    return list(dict.fromkeys(box_of_index(idx, shape) for idx in devmap.values()))


def _boxes(want: _Want) -> list[Box]:
    """The distinct boxes this process needs of a leaf: its devices' shards, or everything."""
    shape = want.record.shape
    if want.sharding is None:
        return [full_box(shape)]
    return _distinct_boxes(want.sharding, tuple(shape))


def _assemble(want: _Want, host: list[np.ndarray], boxes: list[Box]) -> Any:
    """Turns the host boxes of one leaf into the value restore returns."""
    rec = want.record
    if want.key:
        keys = jax.random.wrap_key_data(jax.numpy.asarray(host[0]), impl=rec.prng_impl)
        return keys if want.key_sharding is None else jax.device_put(keys, want.key_sharding)
    dtype = want.dtype or host[0].dtype
    host = [h if h.dtype == dtype else _cast(h, dtype) for h in host]
    if want.uncommitted:
        return jax.device_put(host[0])
    if want.sharding is None:
        value = host[0]
        return value[()] if rec.source == "numpy_scalar" and want.dtype is None else value
    by_box = dict(zip(boxes, host, strict=True))
    shape = tuple(rec.shape)
    # JAX's CPU client adopts an aligned host buffer rather than copying it, so replicas
    # of a box share one buffer: XLA never writes into an adopted buffer, not even when
    # the array is donated (tests/restore/test_memory.py holds JAX to that). One call per
    # leaf places every device's buffer (a third of the cost of device_put per device).
    def buffer(index: Any) -> np.ndarray:
        return by_box[box_of_index(index, shape)]

    return jax.make_array_from_callback(shape, want.sharding, buffer)


# The share of a restore's ``memory_budget`` for chunks in flight (each counted twice: stored
# and decoded); the rest holds the boxes of one wave of leaves until they are placed.
_READ_SHARE = 4


def _waves(jobs: list[ArrayReadJob], job_wants: list[int],
           memory_budget: int | None) -> list[list[int]]:
    """The restore's reads in waves, as positions in ``jobs``: each wave whole leaves (all of
    a leaf's jobs) whose boxes on this process fit the budget's wave share, in leaf order; a
    leaf larger than that share is a wave of its own. One wave without a budget."""
    if memory_budget is None or not jobs:
        return [list(range(len(jobs)))]
    limit = memory_budget - memory_budget // _READ_SHARE
    by_want: dict[int, list[int]] = {}
    for k, i in enumerate(job_wants):
        by_want.setdefault(i, []).append(k)
    waves: list[list[int]] = [[]]
    held = 0
    for ks in by_want.values():
        size = sum(box_size(b) * jobs[k].dtype.itemsize for k in ks for b in jobs[k].targets)
        if waves[-1] and held + size > limit:
            waves.append([])
            held = 0
        waves[-1].extend(ks)
        held += size
    return waves


def _read_wave(jobs: list[ArrayReadJob], job_wants: list[int], wants: list[_Want],
               values: list[Any], memory_budget: int | None, deadline: Deadline | None,
               placed: bool) -> int:
    """Reads one wave's boxes and assembles its leaves into ``values``; returns the bytes
    read. ``placed``: wait until the leaves are on their devices, so that the wave's host
    buffers are free before the next wave allocates its own (on accelerators; a CPU device
    adopts them as they are)."""
    read_budget = None if memory_budget is None else max(1, memory_budget // _READ_SHARE)
    hosts = read_arrays(jobs, memory_budget=read_budget, deadline=deadline)
    pieces: dict[int, tuple[list[np.ndarray], list[Box]]] = {}
    for i, job, host in zip(job_wants, jobs, hosts, strict=True):
        got = pieces.setdefault(i, ([], []))
        got[0].extend(host)
        got[1].extend(job.targets)
    read = sum(box.nbytes for host in hosts for box in host)
    del hosts
    for i, (host, boxes) in pieces.items():
        values[i] = _assemble(wants[i], host, boxes)
    if placed:
        jax.block_until_ready(  # type: ignore[no-untyped-call]  # unannotated in JAX
            [values[i] for i in pieces])
    return read


def _cast(host: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """An aligned copy of ``host`` as ``dtype``, which JAX adopts without another copy."""
    out = aligned_empty(host.shape, dtype)
    np.copyto(out, host, casting="same_kind")
    return out


def restore_from(store: Store, target: Any = None, *, mesh: Any = None,
                 item: str | None = None, memory_budget: int | None = None,
                 deadline: Deadline | None = None, names: NamesLike = None,
                 opened: Readable | None = None) -> Any:
    """Restores the checkpoint in ``store``; see `ckpt.restore`. ``opened``: the
    checkpoint already opened (a manager's `ckpt._tiers.Tiered`), read instead.

    Called on every process that needs the state; each reads only the boxes its own
    devices hold (or the whole arrays, for a host-numpy restore). With a ``deadline``,
    ``store`` is bound by it too (a `DeadlineStore`, made here if it is not one).
    """
    with gc_paused():  # planning and placing allocate tens of objects a leaf
        if deadline is not None and not isinstance(store, DeadlineStore):
            store = DeadlineStore(store, deadline)
        # A target names the items of an Orbax step it wants by its top-level keys.
        wanted = {k for k in target if isinstance(k, str)} \
            if item is None and isinstance(target, Mapping) else None
        source = open_readable(store, item, wanted) if opened is None else opened
        rules = None if names is None else NameRules(names)
        source = source.for_target(None if target is None else flatten(target)[0], rules)
        for _ in range(OVERWRITE_RETRIES):
            try:
                return _restore_source(source, target, mesh, memory_budget, deadline)
            except CorruptCheckpointError as exc:
                # Overwritten while read (`overwrite=True`, `ckpt reshard --overwrite`): its old
                # attempt is deleted once COMMIT names the new one. Then read the new one whole;
                # a checkpoint nothing replaced is really damaged.
                again = source.replacement()
                if again is None and source.removed():
                    raise CheckpointNotFoundError(
                        f"{store.url} was removed while it was read (a delete, the run's "
                        "retention or a rewind): nothing was returned") from exc
                if again is None:
                    raise exc from None
                if jax.process_count() > 1:
                    # Each process would switch on its own: some could return the old
                    # checkpoint's shards and others the new one's, in one global array.
                    raise CheckpointNotFoundError(
                        f"{store.url} was overwritten while process {jax.process_index()} read "
                        f"it (attempt {source.manifest.attempt} replaced by "
                        f"{again.manifest.attempt}); restore again on every process") from exc
                log.info("%s was overwritten while it was read; reading the new checkpoint",
                         store.url)
                source = again
        return _restore_source(source, target, mesh, memory_budget, deadline)


# Overwrites a single restore survives back to back before it gives up and reports.
OVERWRITE_RETRIES = 3


def _restore_source(source: Readable, target: Any, mesh: Any,
                    memory_budget: int | None, deadline: Deadline | None) -> Any:
    manifest = source.manifest
    wants, treedef = _match(manifest, target, mesh, source.store.url)
    _warn_defaulted(wants, source.store.url)
    jobs: list[ArrayReadJob] = []
    job_wants: list[int] = []
    values: list[Any] = [None] * len(wants)
    setters: list[tuple[Any, Any]] = []  # (stateful target leaf, its state): set last
    source.check_files([w.record for w in wants if w.record.kind == LeafKind.ARRAY])
    for i, want in enumerate(wants):
        rec = want.record
        what = f"{source.store.url} leaf {path_text(rec.path)}"
        if rec.kind == LeafKind.PER_PROCESS:
            values[i] = _per_process_value(want, setters)
        elif want.keep is not None:
            values[i] = want.keep
        elif rec.kind == LeafKind.EMPTY:
            values[i] = {} if rec.vtype == "dict" else []
        elif rec.kind == LeafKind.VALUE:
            values[i] = decode_value(rec, what)
            if want.dtype is not None:  # a number restored as a 0-d array
                # numpy 1.x wraps an out-of-range integer around (2.x raises): check first.
                fits = not (want.dtype.kind in "iu" and isinstance(values[i], int)) or \
                    np.iinfo(want.dtype).min <= values[i] <= np.iinfo(want.dtype).max
                try:
                    number = np.asarray(values[i], dtype=want.dtype) if fits else None
                except OverflowError:
                    number = None
                if number is None:
                    raise DtypeMismatchError(f"{what}: {values[i]} does not fit "
                                             f"{want.dtype}") from None
                values[i] = _assemble(want, [number], [full_box(())])
        elif rec.kind == LeafKind.INLINE:
            whole = decode_inline(rec, what)
            boxes = _boxes(want)
            values[i] = _assemble(want, [whole[to_slices(b)] for b in boxes], boxes)
        elif rec.kind == LeafKind.ARRAY:
            for job in source.read_jobs(rec, _boxes(want)):
                jobs.append(job)
                job_wants.append(i)
    started = time.monotonic()
    read = 0
    waves = _waves(jobs, job_wants, memory_budget)
    for wave in waves:
        read += _read_wave([jobs[k] for k in wave], [job_wants[k] for k in wave], wants,
                           values, memory_budget, deadline, placed=len(waves) > 1)
    seconds = time.monotonic() - started
    log.info("restored %s (%s): %d leaves, read %.1f MiB in %.3f s (%.0f MiB/s)",
             source.store.url, source.layout, len(wants), read / 2**20, seconds,
             read / max(seconds, 1e-9) / 2**20)
    # Only now, with every leaf read and checked: a failed restore changes no object.
    for obj, state in setters:
        obj.set_state(state)
    if treedef is None:
        return nest([(w.record.path, v) for w, v in zip(wants, values, strict=True)])
    return unflatten(treedef, values)


def restore(url: StoreLike, target: Any = None, *, mesh: Any = None,
            item: str | None = None, timeout_s: float | None = None,
            names: NamesLike = None, memory_budget: int | None = None) -> Any:
    """Restores the committed checkpoint at ``url``.

    Args:
        url: the checkpoint's path or URL: one of this library's checkpoints, one written
            by orbax-checkpoint (an item folder, or a CheckpointManager step folder), or
            safetensors (a ``.safetensors`` file, or a folder of them with or without a
            Hugging Face index), recognised from its files. An Orbax step of one item
            restores as that item, one of several items as ``{item name: item}`` (pytree,
            JSON and Grain iterator items; the manager's ``metrics`` item is the step's
            metrics instead). From safetensors each process reads only the byte ranges of
            a tensor its devices need; each tensor must match its target leaf's shape and
            dtype exactly, and every tensor needs a target leaf.
        target: None, or a pytree whose leaves are `jax.ShapeDtypeStruct` (with
            ``.sharding``), `jax.Array` (its sharding and dtype are used) or numpy arrays
            (restored as host numpy arrays of their dtype). It may cover part of the saved
            tree: only its leaves are read. A different dtype casts within its kind.
        mesh: restore arrays with their saved PartitionSpecs on this mesh (same axis names).
        item: restore one item only: an Orbax step's item by name (its other items are not
            opened), or the subtree under one top-level key of any other checkpoint; the
            target (if any) is then that item's.
        timeout_s: bound on the whole restore, in seconds (None: none beyond each storage
            request's own deadline, ``request_timeout_s``). A request still under way then
            is abandoned and `DeadlineExceededError` names the URL and what was being read.
        names: for safetensors, name rules after the defaults (`ckpt._names`; docs/
            safetensors.md): how each target leaf's key path names its tensor, and which
            tensors of the files to leave out. Other formats refuse them.
        memory_budget: bytes of host memory this process holds for array data at once
            (None: every box at once, plus chunks in flight up to an eighth of it, 64 MiB
            to 1 GiB). With a budget, leaves are read in waves: three quarters of it for
            the boxes of a wave's leaves, held until they are placed on their devices (and
            freed then, on accelerators; a CPU device keeps them as the arrays), a quarter
            for chunks in flight. A leaf whose boxes on this process exceed the wave share
            is read alone. At least 1 MiB (a chunk is read whole; one larger than its
            share is let through alone).

    Returns:
        With a target: a tree of its structure, shardings and dtypes. Without one: nested
        dicts and lists of numpy arrays (or, with ``mesh``, of jax.Arrays) and values.

    Raises:
        CheckpointNotFoundError: no committed checkpoint at ``url`` (nothing is written).
        TargetMismatchError: the target disagrees; the message names the leaves.
        MissingLeafError: no item ``item`` (the message lists those there are).
        CorruptCheckpointError: a digest or checksum failed; no wrong data is returned.
        UnsupportedFormatError: an Orbax checkpoint using what this library cannot read
            (the message names the file that shows it).
        DeadlineExceededError: ``timeout_s`` passed first (nothing is returned).
    """
    deadline = None if timeout_s is None else Deadline(timeout_s, f"restoring {url}")
    return restore_from(open_store(url), target, mesh=mesh, item=item, deadline=deadline,
                        names=names, memory_budget=checked_budget(memory_budget))


def checked_budget(memory_budget: int | None) -> int | None:
    """A restore's ``memory_budget`` (`restore`), checked.

    Raises:
        InvalidArgumentError: not None and not an int of at least 1 MiB.
    """
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or \
            memory_budget < MIN_RESTORE_BUDGET:
        raise InvalidArgumentError(
            f"memory_budget={memory_budget!r}: a restore needs at least "
            f"{MIN_RESTORE_BUDGET >> 20} MiB (bytes, an int), or None")
    return memory_budget


MIN_RESTORE_BUDGET = 1 << 20
