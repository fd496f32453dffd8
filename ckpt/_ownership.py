"""Chunk layout and shard ownership: which process writes which chunk, from shardings alone.

Every process computes the same plan from the global shapes and shardings (device ids and
their process indices), with no communication. The unit of ownership is a chunk: a shard, or
a piece of a large shard split so that a resharded restore reads little it does not need and
so that a replicated shard's bytes can be spread over every process that holds a replica.
Chunks are assigned largest first to the least-loaded process among those holding the data
(then the least-loaded device within it): balanced bytes, each chunk written exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

from ckpt.restore.boxes import (
    Box,
    box_of_index,
    box_shape,
    box_size,
    chunk_box,
    flat_index,
    full_box,
    grid_shape,
    unflat_index,
)

# Chunks above this size are split; smaller chunks make resharded reads cheaper (a chunk is
# read and checksummed whole), larger ones mean fewer objects.
MAX_CHUNK_BYTES = 16 << 20
# Shards replicated on several processes are split into at least one chunk per process, but
# not into chunks smaller than this.
MIN_SPLIT_BYTES = 1 << 20
# An array smaller than this that one process holds whole (every shard of it on its
# devices) is one chunk, gathered from its shards: one object instead of one per shard, and
# a resharded restore of so few bytes reads little it does not need anyway.
WHOLE_ARRAY_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ArrayInput:
    """What the plan needs to know of one array leaf.

    Attributes:
        shape: global shape.
        itemsize: bytes per element.
        sharding: a ``jax.sharding.Sharding``, or None for a host (numpy) array, which every
            process is assumed to hold whole.
    """

    shape: tuple[int, ...]
    itemsize: int
    sharding: Any = None


@dataclasses.dataclass
class ArrayPlan:
    """The chunk layout of one array and who writes each chunk.

    Attributes:
        chunk_shape: the regular chunk shape (divides the shard shape).
        writers: writer process of each chunk, in C order of the chunk grid.
        owned: for each chunk this process writes: flat chunk index -> (device or None, the
            global box of the shard holding it on that device).
        gathered: the array is one chunk gathered from the shards this process holds
            (`WHOLE_ARRAY_BYTES`): ``shards`` lists (device, box) of one replica of each.
    """

    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    writers: list[int]
    owned: dict[int, tuple[Any, Box]]
    shards: list[tuple[Any, Box]] = dataclasses.field(default_factory=list)

    @functools.cached_property
    def grid(self) -> tuple[int, ...]:
        return grid_shape(self.shape, self.chunk_shape)

    def chunk_box(self, flat: int) -> Box:
        return chunk_box(unflat_index(flat, self.grid), self.chunk_shape, self.shape)

    def chunk_nbytes(self, itemsize: int) -> list[int]:
        """Each chunk's bytes (edge chunks are smaller), in C order of the grid."""
        return [box_size(self.chunk_box(f)) * itemsize for f in range(len(self.writers))]


def choose_chunk_shape(shard_shape: Sequence[int], itemsize: int, replica_processes: int,
                       max_chunk_bytes: int = MAX_CHUNK_BYTES) -> tuple[int, ...]:
    """Splits a shard shape into a chunk shape that divides it.

    Halves the outermost even dimension (so a chunk of a C-order shard stays one contiguous
    run of memory) until chunks are at most ``max_chunk_bytes`` and, for a
    shard held by several processes, there are at least as many chunks as processes (bounded
    below by `MIN_SPLIT_BYTES` per chunk). Deterministic: every process gets the same answer.
    """
    chunk = [max(1, n) for n in shard_shape]
    nbytes = math.prod(chunk) * itemsize
    wanted = max(-(-nbytes // max_chunk_bytes),
                 min(replica_processes, nbytes // MIN_SPLIT_BYTES))
    count = 1
    while count < wanted:
        even = [d for d in range(len(chunk)) if chunk[d] % 2 == 0]
        if not even:
            break
        d = even[0]
        chunk[d] //= 2
        count *= 2
    return tuple(chunk)


def _holders(arr: ArrayInput, process_count: int) -> dict[Box, list[tuple[int, int, Any]]]:
    """Distinct shard boxes -> [(process, device id, device)] holding them, sorted."""
    if arr.sharding is None:
        return {full_box(arr.shape): [(p, -1, None) for p in range(process_count)]}
    out: dict[Box, list[tuple[int, int, Any]]] = {}
    for device, index in arr.sharding.devices_indices_map(arr.shape).items():
        box = box_of_index(index, arr.shape)
        out.setdefault(box, []).append((device.process_index, device.id, device))
    for holders in out.values():
        holders.sort(key=lambda h: (h[0], h[1]))
    return out


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What the plan of an array depends on only through its shape, item size and
    sharding: computed once for the many leaves that share them (an unscanned model's)."""

    chunk_shape: tuple[int, ...]
    chunks: int
    # (negative bytes, flat chunk index, holders, shard box) of each chunk of each shard.
    work: tuple[tuple[int, int, tuple[tuple[int, int, Any], ...], Box], ...]
    # For a gathered array: the one replica (holder, box) of each shard, by process.
    shards: dict[int, tuple[tuple[Any, Box], ...]]


def _layout(arr: ArrayInput, process_count: int) -> _Layout:
    holders = _holders(arr, process_count)
    nbytes = math.prod(arr.shape) * arr.itemsize
    whole = [p for p in sorted({h[0] for hs in holders.values() for h in hs})
             if all(any(h[0] == p for h in hs) for hs in holders.values())]
    if len(holders) > 1 and whole and 0 < nbytes < WHOLE_ARRAY_BYTES:
        everyone = tuple(h for h in holders[next(iter(holders))] if h[0] in whole)
        shards = {p: tuple((next(h for h in hs if h[0] == p)[2], box)
                           for box, hs in holders.items()) for p in whole}
        return _Layout(tuple(arr.shape), 1, ((-nbytes, 0, everyone, full_box(arr.shape)),),
                       shards)
    shard_shape = box_shape(next(iter(holders)))
    for box in holders:
        shard_shape = tuple(max(x, y) for x, y in zip(shard_shape, box_shape(box), strict=True))
    procs = max(len({h[0] for h in hs}) for hs in holders.values())
    chunk_shape = choose_chunk_shape(shard_shape, arr.itemsize, procs)
    grid = grid_shape(arr.shape, chunk_shape)
    work = []
    for box, hs in holders.items():
        # Shard boxes are aligned to the chunk grid because the chunk shape divides the
        # shard shape and shards start at multiples of it.
        starts = [lo // c for (lo, _), c in zip(box, chunk_shape, strict=True)]
        stops = [-(-hi // c) for (_, hi), c in zip(box, chunk_shape, strict=True)]
        for coord in itertools.product(*(range(s, e) for s, e in zip(starts, stops, strict=True))):
            cbox = chunk_box(coord, chunk_shape, arr.shape)
            work.append((-math.prod(box_shape(cbox)) * arr.itemsize, flat_index(coord, grid),
                         tuple(hs), box))
    return _Layout(chunk_shape, math.prod(grid), tuple(work), {})


def plan(arrays: Sequence[ArrayInput], process_index: int, process_count: int) -> list[ArrayPlan]:
    """Computes the chunk layout and writer of every chunk of every array.

    Called by `save_async` on every process with the same arguments except
    ``process_index``; the layouts and writers are identical everywhere.
    """
    process_load = [0] * process_count
    device_load: dict[int, int] = {}
    plans: list[ArrayPlan] = []
    layouts: dict[tuple[Any, ...], _Layout] = {}
    of_array: list[_Layout] = []
    work: list[tuple[int, int, int, tuple[tuple[int, int, Any], ...], Box]] = []
    for a, arr in enumerate(arrays):
        key = (arr.shape, arr.itemsize, arr.sharding)
        if (lay := layouts.get(key)) is None:
            lay = layouts[key] = _layout(arr, process_count)
        of_array.append(lay)
        plans.append(ArrayPlan(arr.shape, lay.chunk_shape, [-1] * lay.chunks, {}))
        work.extend((neg, a, flat, hs, box) for neg, flat, hs, box in lay.work)
    work.sort(key=lambda w: (w[0], w[1], w[2]))
    for neg_bytes, a, flat, hs, box in work:
        if plans[a].writers[flat] != -1:
            continue  # reached again through another replica group of the same box
        proc = min({h[0] for h in hs}, key=lambda q: (process_load[q], q))
        mine = [h for h in hs if h[0] == proc]
        dev = min(mine, key=lambda h: (device_load.get(h[1], 0), h[1]))
        process_load[proc] -= neg_bytes
        device_load[dev[1]] = device_load.get(dev[1], 0) - neg_bytes
        plans[a].writers[flat] = proc
        if proc == process_index:
            plans[a].owned[flat] = (dev[2], box)
            plans[a].shards = list(of_array[a].shards.get(proc, ()))
    return plans


def held_plan(arr: ArrayInput, planned: ArrayPlan, process_index: int,
              process_count: int) -> ArrayPlan:
    """The chunks a process's local copy holds (`ckpt._local`): every chunk of every shard
    its devices hold, one replica each, on ``planned``'s chunk grid; ``writers`` is
    ``process_index`` where held and -1 elsewhere. An array ``planned`` gathers into one
    chunk is held shard by shard instead: a process holding part of it could not write it.

    Called by a save with a local tier, on every process, after `plan`.
    """
    holders = _holders(arr, process_count)
    chunk_shape = planned.chunk_shape
    if len(planned.writers) == 1 and len(holders) > 1:
        shard = box_shape(next(iter(holders)))
        for box in holders:
            shard = tuple(max(x, y) for x, y in zip(shard, box_shape(box), strict=True))
        chunk_shape = tuple(max(1, n) for n in shard)
    grid = grid_shape(arr.shape, chunk_shape)
    writers = [-1] * math.prod(grid)
    owned: dict[int, tuple[Any, Box]] = {}
    for box, hs in holders.items():
        mine = [h for h in hs if h[0] == process_index]
        if not mine:
            continue
        starts = [lo // c for (lo, _), c in zip(box, chunk_shape, strict=True)]
        stops = [-(-hi // c) for (_, hi), c in zip(box, chunk_shape, strict=True)]
        for coord in itertools.product(*(range(s, e) for s, e in zip(starts, stops, strict=True))):
            flat = flat_index(coord, grid)
            owned[flat] = (mine[0][2], box)
            writers[flat] = process_index
    return ArrayPlan(tuple(arr.shape), tuple(chunk_shape), writers, owned)
