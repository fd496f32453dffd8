"""Restore: planning reads from saved chunks to target shards, and reading them.

Imported as ``ckpt.restore`` (the folder ``restore/`` is mapped there at install). Pure
planning lives in `ckpt.restore._plan` (no I/O, property-tested); `ckpt.restore._read`
executes a plan with TensorStore under a memory budget. This package never imports the save
path. Calling it, ``ckpt.restore(url, target, *, mesh=None, timeout_s=None)``, restores a
checkpoint: see `ckpt._restore.restore` (the `ckpt` package makes it callable).
"""

from ckpt.restore._errors import CorruptCheckpointError
from ckpt.restore._plan import (
    Box,
    ChunkRead,
    Piece,
    box_of_index,
    box_shape,
    box_size,
    chunk_box,
    chunk_sizes,
    chunks_in,
    flat_index,
    full_box,
    grid_shape,
    intersect,
    plan_reads,
    spec_shard_shape,
    to_slices,
    unflat_index,
)
from ckpt.restore._read import ArrayReadJob, aligned_empty, read_arrays
from ckpt.restore._window import Window

__all__ = [
    "ArrayReadJob", "Box", "aligned_empty", "Window", "ChunkRead", "CorruptCheckpointError", "Piece", "box_of_index",
    "box_shape", "box_size", "chunk_box", "chunk_sizes", "chunks_in", "flat_index", "full_box", "grid_shape",
    "intersect", "plan_reads", "read_arrays", "spec_shard_shape", "to_slices", "unflat_index",
]
