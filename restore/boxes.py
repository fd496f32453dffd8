"""Box geometry: the arithmetic of array boxes and chunk grids, shared by save and restore.

No I/O, no JAX, no state. A *box* is a tuple of ``(start, stop)`` per dimension in global
coordinates. A checkpointed array is a regular grid of chunks (the last chunk along a
dimension may be cut short by the array's edge); a grid coordinate names one chunk, and chunk
lists are recorded in C order of the grid (`flat_index`).

Public as ``ckpt.restore.boxes`` so that every layer that cuts arrays into boxes (the save
plan, ownership, reading, verify, reshard, the Orbax reader) imports it by what it is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from ckpt.storage import InvalidArgumentError

__all__ = [
    "Box", "box_of_index", "box_shape", "box_size", "chunk_box", "chunk_sizes", "chunks_in",
    "flat_index", "full_box", "grid_shape", "intersect", "to_slices", "unflat_index",
]

Box = tuple[tuple[int, int], ...]


def box_of_index(index: Sequence[slice], shape: Sequence[int]) -> Box:
    """Converts a JAX shard index (a tuple of slices) to a box."""
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise InvalidArgumentError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    # JAX may give fewer slices than dimensions for trailing whole dimensions.
    out.extend((0, n) for n in shape[len(out):])
    return tuple(out)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def box_size(box: Box) -> int:
    return math.prod(box_shape(box))


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, n) for n in shape)


def to_slices(box: Box, origin: Box | None = None) -> tuple[slice, ...]:
    """Slices selecting ``box``, relative to ``origin``'s start if given."""
    if origin is None:
        return tuple(slice(a, b) for a, b in box)
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, origin, strict=True))


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None if they do not overlap (or it is empty)."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def grid_shape(shape: Sequence[int], chunk_shape: Sequence[int]) -> tuple[int, ...]:
    """Number of chunks along each dimension."""
    return tuple(-(-n // c) for n, c in zip(shape, chunk_shape, strict=True))


def chunk_box(coord: Sequence[int], chunk_shape: Sequence[int], shape: Sequence[int]) -> Box:
    """The global box of the chunk at grid coordinate ``coord``."""
    return tuple((i * c, min((i + 1) * c, n))
                 for i, c, n in zip(coord, chunk_shape, shape, strict=True))


def flat_index(coord: Sequence[int], grid: Sequence[int]) -> int:
    """C-order position of a grid coordinate (the order chunk lists are recorded in)."""
    flat = 0
    for i, g in zip(coord, grid, strict=True):
        flat = flat * g + i
    return flat


def unflat_index(flat: int, grid: Sequence[int]) -> tuple[int, ...]:
    coord = []
    for g in reversed(grid):
        flat, i = divmod(flat, g)
        coord.append(i)
    return tuple(reversed(coord))


def chunk_sizes(shape: Sequence[int], chunk_shape: Sequence[int]) -> list[int]:
    """Element count of every chunk, in C order of the grid (edge chunks are smaller)."""
    grid = grid_shape(shape, chunk_shape)
    return [box_size(chunk_box(unflat_index(f, grid), chunk_shape, shape))
            for f in range(math.prod(grid))]


def chunks_in(box: Box, chunk_shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of every chunk overlapping ``box`` (in C order)."""
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, chunk_shape, strict=True)]
    return itertools.product(*ranges)


def chunk_key(coord: Sequence[int]) -> str:
    """The key of a chunk in its array's folder, under zarr v3's default chunk key encoding
    (``c/i/j``; ``c`` for a 0-d array)."""
    return "/".join(["c", *map(str, coord)])
