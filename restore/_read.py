"""Executing restore plans: chunk reads through TensorStore under a memory budget.

Called by ``ckpt.restore`` (on every process, for the boxes its devices need) and by the
offline tools. Each chunk a process needs is read once, verified by the zarr crc32c codec,
and copied into every target box it overlaps; a chunk that is exactly a target box becomes
that box without a copy. At most ``memory_budget`` bytes of chunks are in flight at once,
on top of the target buffers themselves.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
from collections.abc import Sequence
from typing import Any

import google_crc32c
import numpy as np
import tensorstore as ts

from restore._errors import CorruptCheckpointError
from restore._window import Window
from restore._plan import (
    Box,
    ChunkRead,
    box_shape,
    box_size,
    flat_index,
    grid_shape,
    plan_reads,
    to_slices,
)
from storage import StorageError

DEFAULT_MEMORY_BUDGET = 1 << 30

# TensorStore status codes that mean the stored bytes are wrong or gone, not that the
# store is unreachable.
_INTEGRITY_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION")


@dataclasses.dataclass
class ArrayReadJob:
    """One saved array and the boxes of it a process needs.

    Attributes:
        name: how errors name the array (its key path).
        spec: TensorStore spec opening the saved zarr v3 array.
        context: the TensorStore context of the store it lives in.
        shape: saved global shape.
        chunk_shape: saved chunk shape.
        dtype: saved dtype.
        targets: the boxes to fill, in global coordinates.
        crc32c: per chunk (C order of the chunk grid), the crc32c of its C-order bytes as
            written; each chunk read is checked against it. None skips the check.
    """

    name: str
    spec: dict[str, Any]
    context: ts.Context
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    targets: list[Box]
    crc32c: list[int] | None = None


def open_spec(kvstore: dict[str, Any]) -> dict[str, Any]:
    """The spec to open a saved array for reading: missing chunks are errors, not zeros."""
    return {"driver": "zarr3", "kvstore": kvstore, "open": True,
            "fill_missing_data_reads": False, "recheck_cached_data": False}


def _classify(exc: Exception, job: ArrayReadJob, coord: Sequence[int]) -> Exception:
    text = str(exc)
    where = f"leaf {job.name} chunk {tuple(coord)}"
    if any(text.startswith(code) or f" {code}:" in text for code in _INTEGRITY_CODES):
        return CorruptCheckpointError(f"{where}: {text}")
    return StorageError(errno.EIO, f"reading {where} failed: {text}")


def read_arrays(jobs: Sequence[ArrayReadJob], *,
                memory_budget: int = DEFAULT_MEMORY_BUDGET) -> list[list[np.ndarray]]:
    """Reads every job's target boxes.

    Returns:
        For each job, one host array per target box, with the saved dtype.

    Raises:
        CorruptCheckpointError: a chunk is missing or fails its checksum (names leaf and chunk).
        StorageError: the store could not be read.
    """
    opened = [ts.open(job.spec, context=job.context) for job in jobs]
    arrays = []
    for job, fut in zip(jobs, opened):
        try:
            arr = fut.result()
        except Exception as exc:
            raise _classify(exc, job, ()) from exc
        if tuple(arr.shape) != tuple(job.shape) or arr.dtype.numpy_dtype != job.dtype:
            raise CorruptCheckpointError(
                f"leaf {job.name}: stored array is {arr.dtype.name}{list(arr.shape)}, the "
                f"manifest says {job.dtype}{list(job.shape)}")
        arrays.append(arr)

    outputs: list[list[np.ndarray | None]] = [[None] * len(job.targets) for job in jobs]
    plans = [plan_reads(job.shape, job.chunk_shape, job.targets) for job in jobs]
    for j, (job, plan) in enumerate(zip(jobs, plans)):
        exact = {cr.exact_target for cr in plan if cr.exact_target is not None}
        for t, box in enumerate(job.targets):
            if t not in exact:
                outputs[j][t] = np.empty(box_shape(box), dtype=job.dtype)

    def land(j: int, cr: ChunkRead, fut: Any) -> None:
        try:
            data = fut.result()
        except Exception as exc:
            raise _classify(exc, jobs[j], cr.coord) from exc
        crcs = jobs[j].crc32c
        if crcs is not None:
            # The zarr codec proves the chunk is the one stored under this key; this proves
            # it is the one written for this position (not a chunk moved or swapped).
            flat = flat_index(cr.coord, grid_shape(jobs[j].shape, jobs[j].chunk_shape))
            if google_crc32c.value(np.ascontiguousarray(data).view(np.uint8)) != crcs[flat]:
                raise CorruptCheckpointError(
                    f"leaf {jobs[j].name} chunk {tuple(cr.coord)}: crc32c differs from the "
                    "manifest (the chunk was replaced or moved)")
        if cr.exact_target is not None:
            outputs[j][cr.exact_target] = data
            return
        for piece in cr.pieces:
            out = outputs[j][piece.target]
            assert out is not None
            out[piece.dst] = data[piece.src]

    window = Window(memory_budget)
    try:
        for j, (job, plan) in enumerate(zip(jobs, plans)):
            for cr in plan:
                window.add(arrays[j][to_slices(cr.box)].read(),
                           box_size(cr.box) * job.dtype.itemsize, functools.partial(land, j, cr))
        window.drain()
    finally:
        window.cancel()
    result: list[list[np.ndarray]] = []
    for job, outs in zip(jobs, outputs):
        filled = [o for o in outs if o is not None]
        if len(filled) != len(outs):  # every target is allocated or is an exact chunk
            raise RuntimeError(f"leaf {job.name}: a target box was never filled")
        result.append(filled)
    return result
