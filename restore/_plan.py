"""Restore planning: from saved chunk boxes and target boxes to reads.

No I/O and no JAX here; the box arithmetic is `ckpt.restore.boxes`. `plan_reads` says, for a
set of target boxes (the distinct shards one process must build), which chunks to read and
which part of each chunk lands where, so that every chunk is read once however many target
boxes need it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from ckpt.restore.boxes import Box, box_size, chunk_box, chunks_in, intersect, to_slices
from ckpt.storage import InvalidArgumentError


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

    @property
    def into_one_box(self) -> bool:
        """Whether the whole chunk lands inside one target box (so it can be decoded
        straight into its place there), not only a part of it or parts in several."""
        if len(self.pieces) != 1:
            return False
        return all(s.start == 0 and s.stop == hi - lo
                   for s, (lo, hi) in zip(self.pieces[0].src, self.box, strict=True))


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
    return list(_plan_reads(tuple(shape), tuple(chunk_shape), tuple(targets)))


# The many leaves of one shape, chunking and target boxes (an unscanned model's) share one
# plan: it is computed once (its records are frozen).
@functools.lru_cache(maxsize=1024)
def _plan_reads(shape: tuple[int, ...], chunk_shape: tuple[int, ...],
                targets: tuple[Box, ...]) -> tuple[ChunkRead, ...]:
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
    return tuple(ChunkRead(c, chunk_box(c, chunk_shape, shape), tuple(needed[c]))
                 for c in sorted(needed))


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
        raise InvalidArgumentError(
            f"spec {tuple(spec)} has {len(spec)} entries for {len(shape)} dims")
    seen: set[str] = set()
    out = []
    for dim, n in enumerate(shape):
        entry = spec[dim] if dim < len(spec) else None
        axes = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        parts = 1
        for axis in axes:
            if axis not in mesh:
                raise InvalidArgumentError(f"axis {axis!r} is not in the mesh {mesh}")
            if axis in seen:
                raise InvalidArgumentError(f"axis {axis!r} is used twice in {tuple(spec)}")
            seen.add(axis)
            parts *= mesh[axis]
        if n % parts:
            raise InvalidArgumentError(
                f"dimension {dim} of size {n} is not divisible by {parts} "
                f"(axes {axes})")
        out.append(n // parts)
    return tuple(out)
