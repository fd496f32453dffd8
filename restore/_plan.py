"""Restore planning: pure geometry from saved chunk boxes and target boxes to reads.

No I/O and no JAX here. A *box* is a tuple of ``(start, stop)`` per dimension in global
coordinates. A checkpointed array is a regular grid of chunks (the last chunk along a
dimension may be cut short by the array's edge). `plan_reads` says, for a set of target boxes
(the distinct shards one process must build), which chunks to read and which part of each
chunk lands where, so that every chunk is read once however many target boxes need it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

Box = tuple[tuple[int, int], ...]


def box_of_index(index: Sequence[slice], shape: Sequence[int]) -> Box:
    """Converts a JAX shard index (a tuple of slices) to a box."""
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
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
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, origin))


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None if they do not overlap (or it is empty)."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def grid_shape(shape: Sequence[int], chunk_shape: Sequence[int]) -> tuple[int, ...]:
    """Number of chunks along each dimension."""
    return tuple(-(-n // c) for n, c in zip(shape, chunk_shape))


def chunk_box(coord: Sequence[int], chunk_shape: Sequence[int], shape: Sequence[int]) -> Box:
    """The global box of the chunk at grid coordinate ``coord``."""
    return tuple((i * c, min((i + 1) * c, n)) for i, c, n in zip(coord, chunk_shape, shape))


def flat_index(coord: Sequence[int], grid: Sequence[int]) -> int:
    """C-order position of a grid coordinate (the order chunk lists are recorded in)."""
    flat = 0
    for i, g in zip(coord, grid):
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
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, chunk_shape)]
    return itertools.product(*ranges)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of one chunk that lands in one target box.

    Attributes:
        target: position of the target box in the list given to `plan_reads`.
        src: the piece's slices relative to the chunk's own box.
        dst: the piece's slices relative to the target box.
    """

    target: int
    src: tuple[slice, ...]
    dst: tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class ChunkRead:
    """One chunk to read, and where its pieces go."""

    coord: tuple[int, ...]
    box: Box
    pieces: tuple[Piece, ...]


def plan_reads(shape: Sequence[int], chunk_shape: Sequence[int],
               targets: Sequence[Box]) -> list[ChunkRead]:
    """Plans the reads that fill ``targets`` from a chunked array.

    Args:
        shape: the saved global shape.
        chunk_shape: the saved regular chunk shape.
        targets: the boxes to fill (usually the distinct shards a process needs).

    Returns:
        One `ChunkRead` per chunk that overlaps any target, in C order of the chunk grid;
        its pieces exactly tile the overlap of that chunk with each target.
    """
    needed: dict[tuple[int, ...], list[Piece]] = {}
    for t, target in enumerate(targets):
        if box_size(target) == 0:
            continue
        for coord in chunks_in(target, chunk_shape):
            cbox = chunk_box(coord, chunk_shape, shape)
            overlap = intersect(cbox, target)
            if overlap is None:
                continue
            needed.setdefault(tuple(coord), []).append(
                Piece(t, to_slices(overlap, cbox), to_slices(overlap, target)))
    return [ChunkRead(c, chunk_box(c, chunk_shape, shape), tuple(needed[c]))
            for c in sorted(needed)]


def spec_shard_shape(shape: Sequence[int], mesh: dict[str, int],
                     spec: Sequence[str | Sequence[str] | None]) -> tuple[int, ...]:
    """The shard shape of ``shape`` laid out by PartitionSpec ``spec`` on a mesh.

    Pure: the mesh is only axis names and sizes, so offline tools plan layouts for meshes
    of devices they do not have.

    Raises:
        ValueError: the spec names an axis the mesh lacks, uses an axis twice, has more
            entries than dimensions, or a dimension is not divisible by its axes' product
            (the message says which).
    """
    if len(spec) > len(shape):
        raise ValueError(f"spec {tuple(spec)} has {len(spec)} entries for {len(shape)} dims")
    seen: set[str] = set()
    out = []
    for dim, n in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        axes = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        parts = 1
        for axis in axes:
            if axis not in mesh:
                raise ValueError(f"axis {axis!r} is not in the mesh {mesh}")
            if axis in seen:
                raise ValueError(f"axis {axis!r} is used twice in {tuple(spec)}")
            seen.add(axis)
            parts *= mesh[axis]
        if n % parts:
            raise ValueError(f"dimension {dim} of size {n} is not divisible by {parts} "
                             f"(axes {axes})")
        out.append(n // parts)
    return tuple(out)
