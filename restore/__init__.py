"""Restore: planning reads from saved chunks to target shards, and reading them.

Pure planning lives in `restore._plan` (no I/O, property-tested); `restore._read` executes a
plan with TensorStore under a memory budget. This package never imports the save path.
"""

from restore._errors import CorruptCheckpointError
from restore._plan import (
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
from restore._read import ArrayReadJob, aligned_empty, read_arrays
from restore._window import Window

__all__ = [
    "ArrayReadJob", "Box", "aligned_empty", "Window", "ChunkRead", "CorruptCheckpointError", "Piece", "box_of_index",
    "box_shape", "box_size", "chunk_box", "chunk_sizes", "chunks_in", "flat_index", "full_box", "grid_shape",
    "intersect", "plan_reads", "read_arrays", "spec_shard_shape", "to_slices", "unflat_index",
]
