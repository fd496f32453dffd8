"""Reading boxes of an array stored as plain bytes: little-endian, C order, uncompressed, at
a byte offset of one object (a safetensors tensor is one).

Called by `ckpt.restore.read_arrays` for a job with a `RawLayout`, on every process that
restores, for the boxes its devices need. Pure geometry (`byte_runs`, `coalesce`) says which
byte ranges of the object hold a box; each range is read with one ranged request through
TensorStore's kvstore (the same for local files, S3, GCS and memory) and scattered into the
box's buffer. Ranges are read exactly, except that two ranges separated by a gap of at most
`HOLE_BYTES` are read as one (Apache Arrow's default for the same trade-off: a small hole
costs less than another request), and no request is longer than `MAX_REQUEST_BYTES` (a
longer run is read in parts).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ckpt.restore._errors import CorruptCheckpointError
from ckpt.restore.boxes import Box, box_shape
from ckpt.storage import (
    ChunkIO,
    DeadlineExceededError,
    Op,
    StorageError,
    Store,
    Window,
    tensorstore_code,
)

HOLE_BYTES = 8 << 10
MAX_REQUEST_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class RawLayout:
    """Where an array's bytes are: the object ``key`` in the job's kvstore, from byte
    ``offset``, ``prod(shape) * itemsize`` bytes in C order, little-endian. ``generation``
    (if not empty): the object's storage generation when its layout was read; a read that
    finds another (the object was replaced meanwhile) is an error, never other bytes."""

    key: str
    offset: int
    generation: bytes = b""


def byte_runs(shape: Sequence[int], box: Box) -> tuple[np.ndarray, int]:
    """The element offsets at which the runs of ``box`` start in a C-order array of
    ``shape``, in the C order of the box, and the elements each run holds (every run holds
    the same number: the box's extent along its last partial dimension times the whole
    dimensions after it)."""
    extents = box_shape(box)
    if any(e == 0 for e in extents):
        return np.zeros(0, np.int64), 0
    partial = [d for d, (lo, hi) in enumerate(box) if (lo, hi) != (0, shape[d])]
    if not partial:
        return np.zeros(1, np.int64), math.prod(shape)
    last = partial[-1]
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    run = extents[last] * strides[last]
    starts = np.full((), box[last][0] * strides[last], np.int64)
    for d in range(last):
        starts = starts[..., None] + (np.arange(box[d][0], box[d][1], dtype=np.int64)
                                      * strides[d])
    return starts.reshape(-1), run


def coalesce(starts: np.ndarray, run_bytes: int, itemsize: int) -> list[tuple[int, int]]:
    """Groups runs (``starts`` in elements, ascending) into requests: the [first, last) run
    positions each request covers. Neighbours separated by at most `HOLE_BYTES` share a
    request while it stays within `MAX_REQUEST_BYTES` (a longer run is still one request)."""
    groups: list[tuple[int, int]] = []
    if len(starts) == 0:
        return groups
    gaps = (np.diff(starts) * itemsize) - run_bytes
    first = 0
    for i in range(1, len(starts)):
        span = (int(starts[i]) - int(starts[first])) * itemsize + run_bytes
        if gaps[i - 1] > HOLE_BYTES or span > MAX_REQUEST_BYTES:
            groups.append((first, i))
            first = i
    groups.append((first, len(starts)))
    return groups


def _scatter(out2d: np.ndarray, rows: slice, rel: np.ndarray, run: int,
             data: np.ndarray) -> None:
    """Copies runs of ``data`` (starting at element offsets ``rel``) into ``out2d[rows]``."""
    if len(rel) > 1 and (np.diff(rel) == rel[1] - rel[0]).all():
        step = int(rel[1] - rel[0])
        view = np.lib.stride_tricks.as_strided(
            data[int(rel[0]):], shape=(len(rel), run),
            strides=(step * data.itemsize, data.itemsize), writeable=False)
        out2d[rows] = view
        return
    for row, at in zip(range(rows.start, rows.stop), rel, strict=True):
        out2d[row] = data[int(at):int(at) + run]


def _into(view: np.ndarray, data: np.ndarray) -> None:
    view[...] = data


def _land(name: str, layout: RawLayout, begin: int, want: int, dtype: np.dtype[Any],
          store: Store | None, place: Callable[[np.ndarray], None], fut: Any) -> None:
    key = layout.key
    # What a wrapper store sees (`Store.wait`): the exact byte range.
    doing = ChunkIO(Op.READ, name, byte_range=(begin, begin + want), key=key)
    try:
        result = fut.result() if store is None else store.wait(fut, doing)
    except DeadlineExceededError:
        raise
    except Exception as exc:
        if tensorstore_code(exc) in ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS"):
            raise CorruptCheckpointError(f"tensor {name}: {key} is missing or shorter than "
                                         f"its header says: {exc}") from None
        raise StorageError(errno.EIO, f"{doing} failed: {exc}") from exc
    if result.state != "value" or len(result.value) != want:
        got = len(result.value) if result.state == "value" else 0
        raise CorruptCheckpointError(f"tensor {name}: {key} is shorter than its header says "
                                     f"(read {got} of {want} bytes)")
    if layout.generation and bytes(result.stamp.generation) != layout.generation:
        raise CorruptCheckpointError(f"tensor {name}: {key} was replaced while it was read "
                                     "(its header no longer describes it)")
    data = np.frombuffer(result.value, dtype=dtype)
    if dtype == np.bool_ and (data.view(np.uint8) > 1).any():
        # numpy and XLA take a bool byte as it is: 7 would count as 7 in a sum.
        raise CorruptCheckpointError(f"tensor {name}: bytes {begin}-{begin + want} of {key} "
                                     "hold bool values other than 0 and 1")
    place(data)


def read_raw(name: str, kvstore: Any, layout: RawLayout, shape: Sequence[int],
             dtype: np.dtype[Any], outputs: Sequence[np.ndarray], targets: Sequence[Box],
             window: Window, store: Store | None = None) -> None:
    """Issues the reads that fill each of ``outputs`` (the buffers of ``targets``) through
    ``window``; they land as the window finishes them, on the calling thread.

    Raises (from the window, as reads land):
        CorruptCheckpointError: the object is missing or shorter than ``layout`` says, or a
            bool tensor holds a byte other than 0 or 1.
        StorageError: it could not be read.
    """
    little = dtype.newbyteorder("<")
    itemsize = dtype.itemsize
    piece = max(1, MAX_REQUEST_BYTES // itemsize)

    def read(begin: int, want: int, place: Callable[[np.ndarray], None]) -> None:
        fut = kvstore.read(layout.key, byte_range=slice(begin, begin + want))
        window.add(fut, want, functools.partial(_land, name, layout, begin, want, little,
                                                store, place))

    for out, box in zip(outputs, targets, strict=True):
        starts, run = byte_runs(shape, box)
        if run == 0:
            continue
        out2d = out.reshape(len(starts), run)
        for first, last in coalesce(starts, run * itemsize, itemsize):
            lo = int(starts[first])
            if last == first + 1 and run > piece:
                # One long run: in requests of at most MAX_REQUEST_BYTES, each landing in
                # its part of the row (no request holds a whole large tensor at once).
                for at in range(0, run, piece):
                    stop = min(run, at + piece)
                    read(layout.offset + (lo + at) * itemsize, (stop - at) * itemsize,
                         functools.partial(_into, out2d[first, at:stop]))
                continue
            hi = int(starts[last - 1]) + run
            read(layout.offset + lo * itemsize, (hi - lo) * itemsize, functools.partial(
                _scatter, out2d, slice(first, last), starts[first:last] - lo, run))
