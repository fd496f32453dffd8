"""Restore: planning reads from saved chunks to target shards, and reading them.

Imported as ``ckpt.restore`` (the folder ``restore/`` is mapped there at install). It knows
no checkpoint format: given an array's shape, chunk shape and the boxes a process needs, pure
planning (`ckpt.restore._plan`, no I/O, property-tested) says which chunks to read, and
`ckpt.restore._read` reads them with TensorStore under a memory budget. The box arithmetic
both the save and the restore paths use is its own public module, `ckpt.restore.boxes`.
This package never imports the save path. Calling it, ``ckpt.restore(url, target, *,
mesh=None, timeout_s=None)``, restores a checkpoint: see `ckpt._restore.restore` (the `ckpt`
package makes it callable).
"""

from ckpt.restore._errors import CorruptCheckpointError
from ckpt.restore._plan import ChunkRead, Piece, plan_reads, spec_shard_shape
from ckpt.restore._raw import RawLayout
from ckpt.restore._read import ArrayReadJob, aligned_empty, read_arrays
from ckpt.restore.boxes import (
    Box,
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
    to_slices,
    unflat_index,
)

__all__ = [
    "ArrayReadJob", "Box", "ChunkRead", "CorruptCheckpointError", "Piece", "RawLayout",
    "aligned_empty", "box_of_index", "box_shape", "box_size", "chunk_box", "chunk_sizes",
    "chunks_in", "flat_index", "full_box", "grid_shape", "intersect", "plan_reads", "read_arrays",
    "spec_shard_shape", "to_slices", "unflat_index",
]
