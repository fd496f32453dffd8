"""The snapshot of a save: the data of every chunk this process owns, taken on the caller's
thread and independent of the caller's arrays, then fetched to host within a memory budget.

Three ways to take it (``snapshot=`` of `ckpt.save_async`; docs/performance.md, "The
snapshot on accelerators"):

- ``view`` (the CPU backend, under ``auto``): a numpy view of each owned shard. JAX keeps a
  buffer a view references alive and skips donating it, so the view is already a snapshot;
  nothing is copied.
- ``device`` (accelerators under ``auto``, when every device has room): an on-device copy of
  each owned shard, all in one batched call (where this process writes only some chunks of
  a shard, those chunks, by one gather per shard); `save_async` returns once the copies are
  made. A fetching thread then
  moves them to host in waves, at most ``budget`` bytes fetched and not yet durable, and
  frees each device copy as soon as it is on host.
- ``host`` (accelerators under ``auto`` when a device lacks room for the copies): the
  caller's shards go to host directly, in the same waves, on the caller's thread: a state
  larger than the budget makes `save_async` wait until all but the last budget's worth is
  written.

`take` builds the `Snapshot` (caller's thread, after ownership is planned); the save's
background thread starts `Snapshot.fetch` on its own thread (``device``), or the caller's
thread runs it (``host``), and writes what `Snapshot.feed` hands over, releasing each unit's
bytes when its chunks are durable.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import operator
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ckpt._ownership import ArrayPlan
from ckpt.errors import CkptError, InvalidArgumentError
from ckpt.restore.boxes import Box, box_shape, full_box, to_slices
from ckpt.storage import Deadline

MODES = ("auto", "device", "host")
# Host bytes a save's chunk data may hold beyond the caller's own (fetched from devices and
# not yet durable, or handed to TensorStore and not yet durable).
DEFAULT_MEMORY_BUDGET = 1 << 30
# Share of a device's memory limit the on-device copies may bring its use up to: the rest is
# left for the training step that runs while the copies wait for their turn to go to host.
DEVICE_FILL = 0.9

log = logging.getLogger("ckpt.save")


def checked_options(snapshot: str, memory_budget: Any) -> int:
    """Validates `save_async`'s (and the manager's) ``snapshot`` and ``memory_budget``;
    returns the budget as an int. Raises ValueError naming the bad value."""
    if snapshot not in MODES:
        raise InvalidArgumentError(
            f"snapshot must be one of {', '.join(MODES)}, got {snapshot!r}")
    try:
        budget = None if isinstance(memory_budget, bool) else operator.index(memory_budget)
    except TypeError:
        budget = None
    if budget is None or budget < 1:
        raise InvalidArgumentError(
            f"memory_budget must be a positive whole number of bytes, got "
            f"{memory_budget!r}")
    return budget


def choose_mode(requested: str, platform: str, room: dict[Any, int | None],
                need: dict[Any, int]) -> str:
    """The way to take a snapshot: ``view``, ``device`` or ``host`` (module docstring).

    A pure function of the request, the devices' platform, each device's free bytes
    (`free_bytes`; None where the platform does not say) and the bytes of on-device copies
    each device would need. ``device`` and ``host`` are honoured on any platform (on CPU they
    run the accelerator paths, which the tests use); ``auto`` takes views on CPU, device
    copies where every device says it has room for them, else the direct path.
    """
    if requested not in MODES:
        raise InvalidArgumentError(
            f"snapshot must be one of {', '.join(MODES)}, got {requested!r}")
    if requested != "auto":
        return requested
    if platform == "cpu":
        return "view"
    for device, nbytes in need.items():
        free = room.get(device)
        if free is None or nbytes > free:
            return "host"
    return "device"


def free_bytes(device: Any) -> int | None:
    """Bytes of ``device``'s memory the on-device copies may use (`DEVICE_FILL` of its limit,
    less what is in use), or None when its platform reports no memory statistics."""
    try:
        stats = device.memory_stats()
    except Exception:  # platforms without statistics raise rather than return None
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] * DEVICE_FILL) - int(stats.get("bytes_in_use", 0))


@dataclasses.dataclass
class ChunkWrite:
    """One chunk this process writes, made from its unit's host sources: ``source``'s
    ``local`` index, or, for an array gathered into one chunk, ``parts`` (global box,
    source index) copied into one buffer of ``shape``."""

    record: int
    flat: int
    slices: tuple[slice, ...]
    source: int = 0
    local: tuple[Any, ...] = ()  # slices of the shard, or (i,): chunk i of gathered chunks
    parts: list[tuple[Box, int]] = dataclasses.field(default_factory=list)
    shape: tuple[int, ...] = ()

    def data(self, host: list[np.ndarray]) -> np.ndarray:
        if not self.parts:
            # numpy's stubs allow a scalar for an integer index; here it always gives an
            # array: the slices of a shard, or chunk i of a stack of gathered chunks.
            chunk: np.ndarray = host[self.source][self.local]
            return chunk
        out = np.empty(self.shape, dtype=host[self.parts[0][1]].dtype)
        for box, i in self.parts:
            out[to_slices(box)] = host[i]
        return out


@functools.partial(jax.jit, static_argnums=2)
def _chunks_of(shard: jax.Array, starts: jax.Array, size: tuple[int, ...]) -> jax.Array:
    """The chunks of ``shard`` starting at each row of ``starts``, stacked, on its device:
    one dispatch (and one compilation per shard shape, chunk shape and count) for all the
    chunks a process writes of a shard."""
    return jax.vmap(lambda start: jax.lax.dynamic_slice(shard, tuple(start), size))(starts)


@dataclasses.dataclass
class Unit:
    """What is fetched to host at once: ``sources`` (numpy arrays already on host, or
    single-device jax.Arrays: on-device copies, or the caller's shards on the ``host``
    path) and the chunks written from them. ``devices``: each source's (None: on host);
    ``own``: each source is a buffer of the save's own, deleted once fetched. ``gather``:
    (starts, chunk shape) where the chunks cover only part of the one shard, to be taken
    by `_chunks_of` on the device. ``nbytes``: host bytes once fetched."""

    sources: list[Any]
    chunks: list[ChunkWrite]
    devices: list[Any]
    own: list[bool] = dataclasses.field(default_factory=list)
    gather: tuple[np.ndarray, tuple[int, ...]] | None = None
    nbytes: int = 0
    feed: Feed | None = None  # the feed its bytes go back to, if not the snapshot's

    def __post_init__(self) -> None:
        if not self.own:
            self.own = [False] * len(self.sources)

    def take_chunks(self) -> None:
        """Replaces the one shard by its owned chunks, copied on its device."""
        assert self.gather is not None
        starts, size = self.gather
        self.sources, self.own, self.gather = [_chunks_of(self.sources[0], starts, size)], \
            [True], None

    def start(self) -> None:
        """Starts the transfers to host (fetching side)."""
        if self.gather is not None:
            self.take_chunks()
        for i, (s, own) in enumerate(zip(self.sources, self.own, strict=True)):
            if isinstance(s, jax.Array):
                if not own and self.devices[i].platform != "cpu":
                    # JAX keeps a fetched host copy on the array object it fetched through:
                    # through the caller's own shard object, that copy would live as long as
                    # the caller's array. A private alias of the buffer keeps it ours.
                    s = self.sources[i] = jax.make_array_from_single_device_arrays(
                        s.shape, s.sharding, [s])
                s.copy_to_host_async()

    def fetch(self) -> list[np.ndarray]:
        """The sources on host, independent of the device buffers; each buffer of the
        save's own is deleted once its bytes are on host."""
        host = []
        for s, device, own in zip(self.sources, self.devices, self.own, strict=True):
            if not isinstance(s, jax.Array):
                host.append(s)
                continue
            # A CPU device's np.asarray is a view of the buffer: the caller's shards must be
            # copied (a buffer of our own is kept alive by JAX for the view).
            copy = not own and device.platform == "cpu"
            host.append(np.array(s, copy=True) if copy else np.asarray(s))
            if own:
                s.delete()
        self.sources, self.own = [], []
        return host

    def drop(self) -> None:
        """Frees what this unit still holds (a save that failed before fetching it)."""
        for s, own in zip(self.sources, self.own, strict=True):
            if own and isinstance(s, jax.Array) and not s.is_deleted():
                s.delete()
        self.sources, self.own = [], []


class Cancelled(CkptError):
    """The writing side gave up (its save failed): fetching stops."""


class Feed:
    """Fetched units handed from the fetching thread to the writing thread, with at most
    ``budget`` bytes fetched and not yet released (one unit is always admitted, however
    large, so that a save never stalls). The writer releases a unit's bytes once its chunks
    are durable; ``peak`` is the most bytes held at once."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.peak = 0
        self._used = 0
        self._cond = threading.Condition()
        self._ready: collections.deque[tuple[Unit, list[np.ndarray]]] = collections.deque()
        self._closed = False
        self._error: BaseException | None = None
        self._cancelled: BaseException | None = None

    def reserve(self, nbytes: int, block: bool = True) -> bool:
        """Fetching side: room for ``nbytes`` more; False if there is none and not ``block``.
        Raises `Cancelled` once the writing side gave up."""
        with self._cond:
            while True:
                if self._cancelled is not None:
                    raise Cancelled(f"the save stopped: {self._cancelled}")
                if self._used == 0 or self._used + nbytes <= self.budget:
                    self._used += nbytes
                    self.peak = max(self.peak, self._used)
                    return True
                if not block:
                    return False
                self._cond.wait()

    def put(self, unit: Unit, host: list[np.ndarray]) -> None:
        """Fetching side: a unit on host. Dropped once the writing side gave up, so that a
        failed save (kept with its error) holds no host copies."""
        with self._cond:
            if self._cancelled is None:
                self._ready.append((unit, host))
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        """Fetching side: every unit was put (or ``error`` stopped it)."""
        with self._cond:
            self._closed, self._error = True, error
            self._cond.notify_all()

    def release(self, nbytes: int) -> None:
        """Writing side: a unit's chunks are durable."""
        with self._cond:
            self._used -= nbytes
            self._cond.notify_all()

    def cancel(self, exc: BaseException) -> None:
        """Writing side: the save failed; the fetching side stops at its next step."""
        with self._cond:
            self._cancelled = exc
            self._ready.clear()
            self._cond.notify_all()

    def items(self, deadline: Deadline,
              idle: Callable[[], bool]) -> Iterator[tuple[Unit, list[np.ndarray]]]:
        """Writing side: the fetched units in order, until the fetching side closes; its
        error, if it stopped on one, is raised here. With nothing fetched, ``idle`` runs
        first (the writer finishes a write, releasing its bytes: the fetching side may be
        waiting for them) and the wait comes only when it returns False."""
        while True:
            with self._cond:
                waiting = not self._ready and not self._closed
            if waiting and idle():
                continue
            with self._cond:
                while not self._ready and not self._closed:
                    deadline.check("waiting for shards to reach host memory")
                    self._cond.wait(min(1.0, max(deadline.remaining(), 0.01)))
                if self._ready:
                    item = self._ready.popleft()
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield item
            del item  # its host copies go with the writer's, not at the next unit


@dataclasses.dataclass
class Snapshot:
    """What one save writes on this process, in order (`take`)."""

    mode: str
    units: list[Unit]
    feed: Feed | None = None  # None: every unit is on host already (``view``)

    def items(self, deadline: Deadline,
              idle: Callable[[], bool]) -> Iterator[tuple[Unit, list[np.ndarray]]]:
        """Writing side: each unit with its host sources, in order (`Feed.items`)."""
        if self.feed is None:
            for unit in self.units:
                yield unit, unit.fetch()
        else:
            yield from self.feed.items(deadline, idle)

    def fetch(self) -> None:
        """Fetching side (``device``: its own thread; ``host``: the caller's): moves each
        unit to host in order, starting the transfers of as many units as the budget
        allows before waiting for the first, and hands them to the feed."""
        assert self.feed is not None
        feed = self.feed
        transit: collections.deque[Unit] = collections.deque()
        try:
            for unit in self.units:
                while transit and not feed.reserve(unit.nbytes, block=False):
                    done = transit.popleft()
                    feed.put(done, done.fetch())
                if not transit:
                    feed.reserve(unit.nbytes)
                unit.start()
                transit.append(unit)
            while transit:
                done = transit.popleft()
                feed.put(done, done.fetch())
        except BaseException as exc:
            # The writing side raises it (the save fails through its handle); here it would
            # be lost on a thread, or end `save_async` with a save still under way.
            self.release()
            feed.close(exc)
            if not isinstance(exc, Exception):
                raise
            return
        feed.close()

    def cancel(self, exc: BaseException) -> None:
        """Writing side, when its writes failed: whoever fills the feed stops at its next
        step instead of waiting for room that will never come."""
        if self.feed is not None:
            self.feed.cancel(exc)

    def release(self) -> None:
        """Frees every device copy still held (a save that ended early) and the rest,
        fetched or not."""
        for unit in self.units:
            unit.drop()
        self.units = []
        if self.feed is not None:
            self.feed.cancel(Cancelled("the snapshot was released"))


def _device_indices(leaf: jax.Array, cache: dict[Any, dict[Any, int]]) -> dict[Any, int]:
    """Device -> index of its shard in ``leaf.addressable_data``, the same for every array
    of one sharding: asked of JAX once per sharding, not once per leaf (building
    ``addressable_shards`` costs tens of microseconds an array)."""
    found = cache.get(leaf.sharding)
    if found is None:
        found = cache[leaf.sharding] = {s.device: i for i, s in
                                        enumerate(leaf.addressable_shards)}
    return found


def take(leaves: list[Any], plans: dict[int, ArrayPlan], requested: str,
         budget: int) -> Snapshot:
    """The snapshot of the chunks this process owns (caller's thread, after planning).
    Returns once the caller may change, donate or delete its arrays, except on the ``host``
    path, whose caller then runs `Snapshot.fetch` before returning."""
    first = next((leaves[r] for r, p in plans.items()
                  if p.owned and isinstance(leaves[r], jax.Array)), None)
    platform = next(iter(first.sharding.device_set)).platform if first is not None else "cpu"
    views = requested == "auto" and platform == "cpu"
    indices: dict[Any, dict[Any, int]] = {}
    units: list[Unit] = []
    # (record, device) -> the unit of that shard, and the chunks it holds.
    by_shard: dict[tuple[int, Any], Unit] = {}
    for r, p in plans.items():
        leaf = leaves[r]
        if not p.owned:
            continue
        if not isinstance(leaf, jax.Array):
            for flat in sorted(p.owned):
                # numpy leaves are mutable: copy the owned chunks now, in native byte order
                # (a big-endian leaf is written and checksummed as the format's bytes).
                box = p.chunk_box(flat)
                part = leaf[to_slices(box)]
                data = np.array(part, dtype=part.dtype.newbyteorder("="), copy=True)
                units.append(Unit([data], [ChunkWrite(r, flat, to_slices(box))], [None]))
            continue
        where = _device_indices(leaf, indices)
        if p.shards:
            parts = [(box, i) for i, (_, box) in enumerate(p.shards)]
            units.append(Unit([_shard_on(leaf, where, d, views) for d, _ in p.shards],
                              [ChunkWrite(r, 0, to_slices(full_box(p.shape)), parts=parts,
                                          shape=p.shape)],
                              [d for d, _ in p.shards]))
            continue
        for flat, (device, shard_box) in sorted(p.owned.items()):
            unit = by_shard.get((r, device))
            if unit is None:
                unit = by_shard[(r, device)] = Unit([_shard_on(leaf, where, device, views)],
                                                    [], [device])
                units.append(unit)
            box = p.chunk_box(flat)
            unit.chunks.append(ChunkWrite(r, flat, to_slices(box),
                                          local=to_slices(box, shard_box)))
    if views:
        for u in units:
            # Made now, before the caller can donate or delete: the views are the snapshot.
            u.sources = [np.asarray(s) for s in u.sources]
        return Snapshot("view", units)
    need: dict[Any, int] = collections.Counter()
    for u in units:
        if u.devices[0] is None:
            continue
        _plan_gather(u)
        if u.gather is not None:
            u.nbytes = sum(math.prod(box_shape(_box(c.slices))) for c in u.chunks) \
                * u.sources[0].dtype.itemsize
            need[u.devices[0]] += u.nbytes
        else:
            for src, d in zip(u.sources, u.devices, strict=True):
                need[d] += src.nbytes
                u.nbytes += src.nbytes
    mode = choose_mode(requested, platform, {d: free_bytes(d) for d in need}, need)
    if requested == "auto" and mode == "host":
        log.warning("saving with direct device-to-host copies: a device lacks the memory for "
                    "on-device copies of its shards (%s)", ", ".join(
                        f"{d}: needs {n / 2**20:.0f} MiB" for d, n in need.items()))
    if mode == "device":
        _copy_on_device(units)
    return Snapshot(mode, units, Feed(budget))


def _shard_on(leaf: jax.Array, where: dict[Any, int], device: Any, views: bool) -> jax.Array:
    """``leaf``'s shard on ``device``. For views any replica's buffer serves, and
    `addressable_data` is the cheap way in (it gives the first device's for a fully
    replicated array); copies and transfers take the planned device's own buffer, so that
    they spread over the devices as planned."""
    if views:
        return leaf.addressable_data(where[device])
    shard: jax.Array = leaf.addressable_shards[where[device]].data  # unannotated in JAX
    return shard


def _box(slices: tuple[slice, ...]) -> Box:
    return tuple((sl.start, sl.stop) for sl in slices)


def _plan_gather(unit: Unit) -> None:
    """Sets ``unit.gather`` when its chunks, all of one shape, cover only part of its one
    shard (a replicated shard whose chunks are spread over devices or processes): only
    those bytes are then copied and moved. Each chunk becomes its index in the stack."""
    if unit.chunks[0].parts:
        return
    shard = unit.sources[0]
    shapes = {box_shape(_box(c.local)) for c in unit.chunks}
    covered = sum(math.prod(box_shape(_box(c.local))) for c in unit.chunks)
    if covered >= shard.size or len(shapes) != 1:
        return  # the whole shard (or, rarely, uneven chunks: the whole shard too)
    starts = np.array([[sl.start for sl in c.local] for c in unit.chunks], dtype=np.int32)
    unit.gather = (starts, shapes.pop())
    for i, c in enumerate(unit.chunks):
        c.local = (i,)


def _copy_on_device(units: list[Unit]) -> None:
    """Replaces every unit's device sources by copies on the same device, the whole shards
    in one batched call, the partly owned ones by their chunks, all waited for: the
    caller's buffers are then free to go."""
    jobs: list[tuple[Unit, int]] = []
    arrays: list[jax.Array] = []
    for u in units:
        if not u.sources or u.devices[0] is None:
            continue
        if u.gather is not None:
            u.take_chunks()
            continue
        for i, s in enumerate(u.sources):
            jobs.append((u, i))
            arrays.append(s)
    if arrays:
        copies = jax.device_put(arrays, [a.sharding for a in arrays], may_alias=False)
        for (u, i), c in zip(jobs, copies, strict=True):
            u.sources[i] = c
            u.own[i] = True
    jax.block_until_ready(  # type: ignore[no-untyped-call]  # unannotated in JAX
        [s for u in units for s in u.sources if isinstance(s, jax.Array)])


def start_fetching(snapshot: Snapshot, name: str) -> Callable[[], None] | None:
    """Starts `Snapshot.fetch` on its own thread for the ``device`` path (the save's
    background thread calls it before writing); returns a join, or None on other paths."""
    if snapshot.mode != "device":
        return None
    thread = threading.Thread(target=snapshot.fetch, name=name, daemon=True)
    thread.start()
    return thread.join
