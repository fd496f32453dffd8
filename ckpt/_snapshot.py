"""The snapshot of a save: the data of every chunk this process owns, taken on the caller's
thread and independent of the caller's arrays, then fetched to host within a memory budget.

Three ways to take it (``snapshot=`` of `ckpt.save_async`; docs/performance.md, "The
snapshot on accelerators"):

- ``view`` (the CPU backend, under ``auto``): a numpy view of each owned shard. JAX keeps a
  buffer a view references alive and skips donating it, so the view is already a snapshot;
  nothing is copied.
- ``device`` (accelerators under ``auto``, when every device has room): an on-device copy of
  each owned shard (or owned chunk, where this process writes only part of a shard), all in
  one batched call; `save_async` returns once the copies are made. A fetching thread then
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
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ckpt._ownership import ArrayPlan
from ckpt.errors import CkptError
from ckpt.restore.boxes import Box, full_box, to_slices
from ckpt.storage import Deadline

MODES = ("auto", "device", "host")
# Host bytes a save's chunk data may hold beyond the caller's own (fetched from devices and
# not yet durable, or handed to TensorStore and not yet durable).
DEFAULT_MEMORY_BUDGET = 1 << 30
# Share of a device's memory limit the on-device copies may bring its use up to: the rest is
# left for the training step that runs while the copies wait for their turn to go to host.
DEVICE_FILL = 0.9

log = logging.getLogger("ckpt.save")


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
        raise ValueError(f"snapshot must be one of {', '.join(MODES)}, got {requested!r}")
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
    ``local`` slices, or, for an array gathered into one chunk, ``parts`` (global box,
    source index) copied into one buffer of ``shape``."""

    record: int
    flat: int
    slices: tuple[slice, ...]
    source: int = 0
    local: tuple[slice, ...] = ()
    parts: list[tuple[Box, int]] = dataclasses.field(default_factory=list)
    shape: tuple[int, ...] = ()

    def data(self, host: list[np.ndarray]) -> np.ndarray:
        if not self.parts:
            return host[self.source][self.local]
        out = np.empty(self.shape, dtype=host[self.parts[0][1]].dtype)
        for box, i in self.parts:
            out[to_slices(box)] = host[i]
        return out


@dataclasses.dataclass
class Unit:
    """What is fetched to host at once: ``sources`` (numpy arrays already on host, or
    single-device jax.Arrays: on-device copies, or the caller's shards on the ``host``
    path) and the chunks written from them. ``nbytes``: host bytes once fetched (0 for
    sources already on host)."""

    sources: list[Any]
    chunks: list[ChunkWrite]
    devices: list[Any] = dataclasses.field(default_factory=list)  # each source's; None: host
    nbytes: int = 0

    def start(self) -> None:
        for s in self.sources:
            if isinstance(s, jax.Array):
                s.copy_to_host_async()

    def fetch(self, mode: str) -> list[np.ndarray]:
        """The sources on host, independent of the device buffers; on the ``device`` path
        each on-device copy is deleted once its bytes are on host."""
        host = []
        for s, device in zip(self.sources, self.devices):
            if not isinstance(s, jax.Array):
                host.append(s)
                continue
            # A CPU device's np.asarray is a view of the buffer: the caller's shards must be
            # copied (an on-device copy is ours, and JAX keeps it alive for the view).
            copy = mode == "host" and device.platform == "cpu"
            host.append(np.array(s, copy=True) if copy else np.asarray(s))
            if mode == "device":
                s.delete()
        self.sources = []
        return host

    def drop(self, mode: str) -> None:
        """Frees what this unit still holds (a save that failed before fetching it)."""
        if mode == "device":
            for s in self.sources:
                if isinstance(s, jax.Array) and not s.is_deleted():
                    s.delete()
        self.sources = []


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
        with self._cond:
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
                yield unit, unit.fetch(self.mode)
        else:
            yield from self.feed.items(deadline, idle)

    def fetch(self) -> None:
        """Fetching side (``device``: its own thread; ``host``: the caller's): moves each
        unit to host in order, starting the transfers of as many units as the budget
        allows before waiting for the first, and hands them to the feed."""
        assert self.feed is not None
        feed, mode = self.feed, self.mode
        transit: collections.deque[Unit] = collections.deque()
        try:
            for unit in self.units:
                while transit and not feed.reserve(unit.nbytes, block=False):
                    done = transit.popleft()
                    feed.put(done, done.fetch(mode))
                if not transit:
                    feed.reserve(unit.nbytes)
                unit.start()
                transit.append(unit)
            while transit:
                done = transit.popleft()
                feed.put(done, done.fetch(mode))
        except BaseException as exc:
            # The writing side raises it (the save fails through its handle); here it would
            # be lost on a thread, or end `save_async` with a save still under way.
            self.release()
            feed.close(exc)
            if not isinstance(exc, Exception):
                raise
            return
        feed.close()

    def release(self) -> None:
        """Frees every device copy still held (a save that ended early) and the rest."""
        for unit in self.units:
            unit.drop(self.mode)
        self.units = []


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
            sources = [leaf.addressable_data(where[d]) for d, _ in p.shards]
            parts = [(box, i) for i, (_, box) in enumerate(p.shards)]
            units.append(Unit(sources, [ChunkWrite(r, 0, to_slices(full_box(p.shape)),
                                                   parts=parts, shape=p.shape)],
                              [d for d, _ in p.shards]))
            continue
        for flat, (device, shard_box) in sorted(p.owned.items()):
            unit = by_shard.get((r, device))
            if unit is None:
                unit = by_shard[(r, device)] = Unit([leaf.addressable_data(where[device])], [],
                                                    [device])
                units.append(unit)
            box = p.chunk_box(flat)
            unit.chunks.append(ChunkWrite(r, flat, to_slices(box),
                                          local=to_slices(box, shard_box)))
    device = next((d for u in units for d in u.devices if d is not None), None)
    platform = device.platform if device is not None else "cpu"
    need: dict[Any, int] = collections.Counter()
    if requested != "auto" or platform != "cpu":  # views need no room: skip the sums
        for u in units:
            for s, d in zip(u.sources, u.devices):
                if d is not None:
                    need[d] += s.nbytes
    mode = choose_mode(requested, platform, {d: free_bytes(d) for d in need}, need)
    if requested == "auto" and mode == "host":
        log.warning("saving with direct device-to-host copies: a device lacks the memory for "
                    "on-device copies of its shards (%s)", ", ".join(
                        f"{d}: needs {n / 2**20:.0f} MiB" for d, n in need.items()))
    if mode == "view":
        for u in units:
            # Made now, before the caller can donate or delete: the views are the snapshot.
            u.sources = [np.asarray(s) for s in u.sources]
        return Snapshot(mode, units)
    if mode == "device":
        _copy_on_device(units)
    for u in units:
        u.nbytes = sum(s.nbytes for s in u.sources if isinstance(s, jax.Array))
    return Snapshot(mode, units, Feed(budget))


def _copy_on_device(units: list[Unit]) -> None:
    """Replaces every unit's device sources by copies on the same device, made in one
    batched call and waited for: the caller's buffers are then free to go. A unit that
    writes only some chunks of its shard (a replicated shard split over processes) copies
    just those chunks."""
    jobs: list[tuple[Unit, int]] = []
    arrays: list[jax.Array] = []
    for u in units:
        if not u.sources or not isinstance(u.sources[0], jax.Array):
            continue
        if not u.chunks[0].parts and _partial(u):
            # Slicing on the device is a copy of just the owned bytes.
            shard = u.sources[0]
            u.sources = [shard[c.local] for c in u.chunks]
            u.devices = u.devices[:1] * len(u.chunks)
            for i, c in enumerate(u.chunks):
                c.source, c.local = i, ()
            continue
        for i, s in enumerate(u.sources):
            jobs.append((u, i))
            arrays.append(s)
    if arrays:
        copies = jax.device_put(arrays, [a.sharding for a in arrays], may_alias=False)
        for (u, i), c in zip(jobs, copies):
            u.sources[i] = c
    jax.block_until_ready([s for u in units for s in u.sources if isinstance(s, jax.Array)])


def _partial(unit: Unit) -> bool:
    """Whether the unit's chunks cover less than its one shard."""
    shard = unit.sources[0]
    size = 0
    for c in unit.chunks:
        n = 1
        for sl, dim in zip(c.local, shard.shape):
            n *= len(range(*sl.indices(dim)))
        size += n
    return size < shard.size


def start_fetching(snapshot: Snapshot, name: str) -> Callable[[], None] | None:
    """Starts `Snapshot.fetch` on its own thread for the ``device`` path (the save's
    background thread calls it before writing); returns a join, or None on other paths."""
    if snapshot.mode != "device":
        return None
    thread = threading.Thread(target=snapshot.fetch, name=name, daemon=True)
    thread.start()
    return thread.join
