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
import itertools
import math
from collections.abc import Sequence
from typing import Any

from ckpt.restore.boxes import (
    Box,
    box_of_index,
    box_shape,
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
    """

    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    writers: list[int]
    owned: dict[int, tuple[Any, Box]]

    @property
    def grid(self) -> tuple[int, ...]:
        return grid_shape(self.shape, self.chunk_shape)

    def chunk_box(self, flat: int) -> Box:
        return chunk_box(unflat_index(flat, self.grid), self.chunk_shape, self.shape)


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


def plan(arrays: Sequence[ArrayInput], process_index: int, process_count: int) -> list[ArrayPlan]:
    """Computes the chunk layout and writer of every chunk of every array.

    Called by `save_async` on every process with the same arguments except
    ``process_index``; the layouts and writers are identical everywhere.
    """
    process_load = [0] * process_count
    device_load: dict[int, int] = {}
    plans: list[ArrayPlan] = []
    work: list[tuple[int, int, int, list[tuple[int, int, Any]], Box]] = []
    for a, arr in enumerate(arrays):
        holders = _holders(arr, process_count)
        shard_shape = box_shape(next(iter(holders)))
        for box in holders:
            shard_shape = tuple(max(x, y) for x, y in zip(shard_shape, box_shape(box)))
        procs = max(len({h[0] for h in hs}) for hs in holders.values())
        chunk_shape = choose_chunk_shape(shard_shape, arr.itemsize, procs)
        grid = grid_shape(arr.shape, chunk_shape)
        p = ArrayPlan(arr.shape, chunk_shape, [-1] * math.prod(grid), {})
        plans.append(p)
        for box, hs in holders.items():
            # Shard boxes are aligned to the chunk grid because the chunk shape divides the
            # shard shape and shards start at multiples of it.
            starts = [lo // c for (lo, _), c in zip(box, chunk_shape)]
            stops = [-(-hi // c) for (_, hi), c in zip(box, chunk_shape)]
            for coord in itertools.product(*(range(s, e) for s, e in zip(starts, stops))):
                cbox = chunk_box(coord, chunk_shape, arr.shape)
                nbytes = math.prod(box_shape(cbox)) * arr.itemsize
                work.append((-nbytes, a, flat_index(coord, grid), hs, box))
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
    return plans
