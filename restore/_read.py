"""Executing restore plans: chunk reads through TensorStore under a memory budget.

Called by ``ckpt.restore`` (on every process, for the boxes its devices need) and by the
offline tools. Each chunk a process needs is read once, verified by the zarr crc32c codec
and the manifest's crc32c (hashed, or, for a whole chunk in a strided region or of 1 MiB or
more on a local file system, compared with the codec's checksum at the end of the stored
chunk), and copied into every target box it overlaps; a chunk that is inside one target box
is decoded by TensorStore straight into its place in that box's buffer. Chunk data in flight
(stored and decoded bytes) is bounded by a memory budget, on top of the target buffers: by
default an eighth of the bytes restored, between 64 MiB and 1 GiB.

Target buffers are 64-byte aligned (`aligned_empty`): JAX's CPU client then adopts a buffer
as a device array without copying it, which halves restore's memory and saves a copy.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import math
import mmap
from collections.abc import Sequence
from typing import Any

import google_crc32c
import numpy as np
import numpy.typing as npt
import tensorstore as ts

from ckpt.restore._errors import CorruptCheckpointError
from ckpt.restore._plan import ChunkRead, plan_reads
from ckpt.restore._raw import RawLayout, read_raw
from ckpt.restore.boxes import (
    Box,
    box_shape,
    box_size,
    chunk_key,
    flat_index,
    grid_shape,
    to_slices,
)
from ckpt.storage import (
    ChunkIO,
    Deadline,
    DeadlineExceededError,
    ObjectNotFoundError,
    Op,
    StorageError,
    Store,
    UnreadableObjectError,
    Window,
    tensorstore_code,
)

# Whole chunks at least this large, on a local file system, are checked by their stored
# crc32c tail rather than hashed again (`read_arrays`).
TAIL_INSTEAD_OF_HASH_BYTES = 1 << 20
MIN_MEMORY_BUDGET = 64 << 20
MAX_MEMORY_BUDGET = 1 << 30


def default_memory_budget(nbytes: int) -> int:
    """The chunk bytes in flight allowed when restoring ``nbytes``: enough requests for
    throughput, little enough that restore's memory stays close to the restored state's."""
    return max(MIN_MEMORY_BUDGET, min(MAX_MEMORY_BUDGET, nbytes // 8))

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
        crc32c_in_chunk_tail: each stored chunk object ends with the crc32c of its
            little-endian C-order bytes (zarr v3, default key encoding, ``crc32c`` as the
            last codec, which TensorStore verifies on read): for a whole chunk that equals
            ``crc32c``'s entry, so a 4-byte read checks it without hashing the data again.
        store: the store the array lives in; each chunk read is waited for through its
            `Store.wait` (``reading chunk (i, j) of <name>``), so a wrapper store sees it.
        raw: for an array stored as plain bytes in one object (`ckpt.restore._raw`), where
            they are; ``spec`` then holds only the ``kvstore`` and ``chunk_shape`` is unused.
        plain_key: for an array of one uncompressed chunk read whole through ``store``
            (`Store.read_async`) and decoded here, the key of that chunk's object in
            ``store`` (``crc32c`` and ``crc32c_in_chunk_tail`` required): no TensorStore
            array is opened, no ``zarr.json`` read (what it decodes is the job's own
            shape and dtype); ``spec`` is unused.
        chunk_prefix: the key in ``store`` under which the array's chunk objects are
            (``<prefix>/<chunk key>``), when each is its uncompressed little-endian bytes
            then their crc32c (``crc32c`` required). On a local file system a whole chunk
            that does not land inside one target box is then read into a buffer reused
            from chunk to chunk and checked here, instead of being decoded by TensorStore
            into a fresh buffer whose page faults (a 4 KiB page at a time) bounded a
            resharded restore below the disk's speed (docs/performance.md).
    """

    name: str
    spec: dict[str, Any]
    context: ts.Context
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    targets: list[Box]
    crc32c: list[int] | None = None
    crc32c_in_chunk_tail: bool = False
    store: Store | None = None
    raw: RawLayout | None = None
    plain_key: str | None = None
    chunk_prefix: str | None = None


ALIGNMENT = 64
_MAPPED_FROM = 4 << 20  # numpy's own threshold for its huge-page advice


def aligned_empty(shape: Sequence[int], dtype: npt.DTypeLike) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a 64-byte boundary.

    Called by `read_arrays` for every target box, and by restore for casts, so that
    ``jax.device_put`` onto a CPU device adopts the buffer instead of copying it (JAX copies
    host buffers that are less aligned).
    """
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes >= _MAPPED_FROM:
        # Mapped by us, not by numpy: numpy asks the kernel for huge pages on large arrays
        # (MADV_HUGEPAGE), which, where the system leaves huge pages to such requests, made
        # a restore's first touch of its targets 2-8x slower here (fresh 2 MiB blocks found
        # and zeroed on each fault; docs/performance.md "Resharded restore"). The page size
        # is then the system's choice. A page boundary is 64-byte aligned.
        try:
            mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
        except OSError as e:  # as np.empty fails
            raise MemoryError(f"cannot allocate {nbytes} bytes for a restore target") from e
        raw = np.frombuffer(mapped, dtype=np.uint8)
        return raw.view(dt).reshape(tuple(shape))
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset:offset + nbytes].view(dt).reshape(tuple(shape))


def _crc32c(data: np.ndarray) -> int:
    """crc32c of ``data``'s bytes in C order. A strided view is copied first: one memcpy
    costs half as much as hashing it row by row from Python."""
    return int(google_crc32c.value(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))


def _classify(exc: Exception, job: ArrayReadJob, coord: Sequence[int] | None) -> Exception:
    """``coord`` None: opening the array failed (its metadata), else reading that chunk."""
    text, code = str(exc), tensorstore_code(exc)
    where = f"leaf {job.name}" + ("" if coord is None else f" chunk {tuple(coord)}")
    if coord is None and code == "FAILED_PRECONDITION":
        return CorruptCheckpointError(
            f"{where}: its stored zarr.json disagrees with the checkpoint's manifest, which "
            f"fixes how it is decoded: {text[:400]}")
    if code in _INTEGRITY_CODES:
        return CorruptCheckpointError(f"{where}: {text}")
    return StorageError(errno.EIO, f"reading {where} failed: {text}")


def _wait(future: Any, deadline: Deadline | None, doing: str) -> Any:
    return future.result() if deadline is None else deadline.result(future, doing)


def _open(jobs: Sequence[ArrayReadJob], deadline: Deadline | None) -> list[Any]:
    """Opens every job's array, checking its stored shape and dtype against the job's
    (a raw job's kvstore instead: its bytes have no metadata to check)."""
    opened = [None if job.plain_key else
              ts.KvStore.open(job.spec["kvstore"], context=job.context) if job.raw else
              ts.open(job.spec, context=job.context) for job in jobs]
    arrays: list[Any] = []
    for job, fut in zip(jobs, opened, strict=True):
        if fut is None:
            arrays.append(None)
            continue
        if job.raw is not None:
            arrays.append(_wait(fut, deadline, f"opening the store of {job.name}"))
            continue
        try:
            arr = _wait(fut, deadline, f"opening leaf {job.name}")
        except DeadlineExceededError:
            raise
        except Exception as exc:
            raise _classify(exc, job, None) from exc
        if tuple(arr.shape) != tuple(job.shape) or arr.dtype.numpy_dtype != job.dtype:
            raise CorruptCheckpointError(
                f"leaf {job.name}: stored array is {arr.dtype.name}{list(arr.shape)}, the "
                f"manifest says {job.dtype}{list(job.shape)}")
        arrays.append(arr)
    return arrays


def _check_crc32c(job: ArrayReadJob, cr: ChunkRead, data: np.ndarray, stored: Any) -> None:
    """Compares a chunk read with the manifest's crc32c for its position: from the 4 bytes
    that end the stored chunk (``stored``, a read result) when those were read, else by
    hashing ``data``. The zarr codec proves the chunk is the one stored under its key; this
    proves it is the one written for this position (not a chunk moved or swapped)."""
    assert job.crc32c is not None
    flat = flat_index(cr.coord, grid_shape(job.shape, job.chunk_shape))
    if stored is not None:
        crc = int.from_bytes(stored.value, "little") if stored.state == "value" \
            and len(stored.value) == 4 else -1
    else:
        crc = _crc32c(data)
    if crc != job.crc32c[flat]:
        raise CorruptCheckpointError(
            f"leaf {job.name} chunk {tuple(cr.coord)}: crc32c differs from the manifest (the "
            "chunk was replaced or moved)")


def _land(job: ArrayReadJob, outputs: list[np.ndarray], cr: ChunkRead, tail: Any,
          deadline: Deadline | None, fut: Any) -> None:
    """Finishes one chunk read, in issue order on `read_arrays`' thread: waits for it
    (through its store, so that a wrapper sees it), checks it, and places a chunk that
    spans several target boxes into each."""
    try:
        result = fut.result() if job.store is None else \
            job.store.wait(fut, ChunkIO(Op.READ, job.name, tuple(cr.coord)))
        stored = _wait(tail, deadline, "reading chunk checksums") if tail is not None else None
    except DeadlineExceededError:
        raise
    except Exception as exc:
        raise _classify(exc, job, cr.coord) from exc
    direct = cr.into_one_box
    data = outputs[cr.pieces[0].target][cr.pieces[0].dst] if direct else result
    if job.crc32c is not None:
        _check_crc32c(job, cr, data, stored)
    if not direct:
        # Copied by TensorStore's threads: on a small machine the main thread is otherwise
        # the bottleneck of a resharded restore.
        source = ts.array(data, copy=False)
        copies = [ts.array(outputs[piece.target], copy=False, write=True)[piece.dst]
                  .write(source[piece.src]) for piece in cr.pieces]
        for copy in copies:
            copy.result()


def _chunk_object(job: ArrayReadJob, cr: ChunkRead, key: str, fut: Any) -> np.ndarray:
    """A whole chunk read as its stored object (`Store.read_async`), in issue order on
    `read_arrays`' thread: waits for it through its store, checks its size, the crc32c it
    ends with and the manifest's, and returns the chunk (a view of what was read)."""
    assert job.store is not None and job.crc32c is not None
    where = f"leaf {job.name} chunk {tuple(cr.coord)}"
    try:
        stored = job.store.wait(fut, ChunkIO(Op.READ, job.name, tuple(cr.coord)))
    except ObjectNotFoundError as exc:
        raise CorruptCheckpointError(f"{where} is missing: {exc}") from None
    except UnreadableObjectError as exc:  # not a regular file, or larger than it can be
        raise CorruptCheckpointError(f"{where}: {exc}") from None
    except StorageError:
        raise
    except Exception as exc:  # a store of the caller's own that raised something else
        raise StorageError(errno.EIO, f"reading {where} failed: {exc}") from exc
    count = math.prod(job.chunk_shape)
    nbytes = count * job.dtype.itemsize
    if len(stored) != nbytes + 4:
        raise CorruptCheckpointError(
            f"{where}: {job.store.describe(key)} holds {len(stored)} bytes, "
            f"{nbytes + 4} expected (the chunk and its crc32c)")
    data = np.frombuffer(stored, np.uint8, nbytes + 4)
    crc = google_crc32c.value(data[:nbytes])
    if crc != int.from_bytes(data[nbytes:].tobytes(), "little"):
        raise CorruptCheckpointError(f"{where}: its bytes do not match the crc32c stored "
                                     f"with them ({job.store.describe(key)})")
    if crc != job.crc32c[flat_index(cr.coord, grid_shape(job.shape, job.chunk_shape))]:
        raise CorruptCheckpointError(
            f"{where}: crc32c differs from the manifest (the chunk was replaced or moved)")
    if job.dtype.kind == "b" and np.any(data[:nbytes] > 1):  # as TensorStore refuses them
        raise CorruptCheckpointError(f"{where}: a bool chunk holds bytes other than 0 and 1")
    return data[:nbytes].view(job.dtype.newbyteorder("<")).reshape(job.chunk_shape)


def _land_plain(job: ArrayReadJob, outputs: list[np.ndarray], cr: ChunkRead, fut: Any) -> None:
    """Finishes the read of a plain job's one chunk (`ArrayReadJob.plain_key`): checked,
    then copied into every target box on this thread (small: a copy costs less than a
    hand-over to TensorStore's threads)."""
    assert job.plain_key is not None
    chunk = _chunk_object(job, cr, job.plain_key, fut)
    for piece in cr.pieces:
        outputs[piece.target][piece.dst] = chunk[piece.src]


class _Buffers:
    """Chunk buffers of one `read_arrays` call, reused from chunk to chunk (taken and given
    back on its thread): a fresh buffer a chunk would cost its page faults each time.

    At most one buffer waits here, and only while reads into buffers go on: each such read
    is charged twice its buffer in the window (as a TensorStore read is, for its stored and
    decoded bytes), which covers the one waiting; any other read lets it go (`drop`)."""

    def __init__(self) -> None:
        self._free: np.ndarray | None = None

    def take(self, nbytes: int) -> np.ndarray:
        free, self._free = self._free, None
        return free if free is not None and free.size == nbytes else np.empty(nbytes, np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        self._free = buffer

    def drop(self) -> None:
        self._free = None


def _land_spanning(job: ArrayReadJob, outputs: list[np.ndarray], cr: ChunkRead, key: str,
                   buffers: _Buffers, buffer: np.ndarray, fut: Any) -> None:
    """Finishes a whole chunk read into ``buffer`` (`ArrayReadJob.chunk_prefix`): checked,
    copied into every target box it spans by TensorStore's threads (on a small machine this
    thread is otherwise the bottleneck), then the buffer goes back for the next chunk."""
    source = ts.array(_chunk_object(job, cr, key, fut), copy=False)
    copies = [ts.array(outputs[piece.target], copy=False, write=True)[piece.dst]
              .write(source[piece.src]) for piece in cr.pieces]
    for copy in copies:
        copy.result()
    buffers.give(buffer)


def read_arrays(jobs: Sequence[ArrayReadJob], *, memory_budget: int | None = None,
                deadline: Deadline | None = None) -> list[list[np.ndarray]]:
    """Reads every job's target boxes.

    Args:
        jobs: the arrays and boxes to read.
        memory_budget: bound on chunk bytes in flight (each chunk counts twice: its stored
            bytes and its decoded array); None for `default_memory_budget`.
        deadline: when reading must have finished (the restore's ``timeout_s``).

    Returns:
        For each job, one host array per target box, with the saved dtype, each in its own
        64-byte-aligned buffer.

    Raises:
        CorruptCheckpointError: a chunk is missing or fails its checksum (names leaf and chunk).
        StorageError: the store could not be read.
        DeadlineExceededError: ``deadline`` passed first.
    """
    arrays = _open(jobs, deadline)
    outputs = [[aligned_empty(box_shape(box), job.dtype) for box in job.targets]
               for job in jobs]
    plans = [[] if job.raw else plan_reads(job.shape, job.chunk_shape, job.targets)
             for job in jobs]
    if memory_budget is None:
        memory_budget = default_memory_budget(sum(
            box_size(box) * job.dtype.itemsize for job in jobs for box in job.targets))
    kvstores = [ts.KvStore.open(job.spec["kvstore"], context=job.context)
                if job.crc32c is not None and job.crc32c_in_chunk_tail and not job.raw
                and not job.plain_key else None for job in jobs]
    window = Window(memory_budget, deadline, "reading chunks")
    buffers = _Buffers()
    try:
        for job, array, out, plan, opening in zip(jobs, arrays, outputs, plans, kvstores,
                                                  strict=True):
            if job.raw is not None:
                read_raw(job.name, array, job.raw, job.shape, job.dtype, out, job.targets,
                         window, job.store)
                continue
            buffers.drop()
            if job.plain_key is not None:
                assert job.store is not None
                for cr in plan:  # the one chunk, or none of a zero-size array
                    size = box_size(cr.box) * job.dtype.itemsize
                    window.add(job.store.read_async(job.plain_key, max_bytes=size + 4),
                               2 * size, functools.partial(_land_plain, job, out, cr))
                continue
            kvstore = _wait(opening, deadline, f"opening leaf {job.name}") \
                if opening is not None else None
            # On a local file system the 4-byte tail of a large chunk costs less than hashing
            # it again on this thread (which bounded a same-mesh restore at ~75% of the
            # disk's read speed); a small chunk hashes faster than a read, and on an object
            # store a tail is one more request per chunk.
            tail_always = (kvstore is not None and job.spec["kvstore"].get("driver") == "file"
                           and math.prod(job.chunk_shape) * job.dtype.itemsize
                           >= TAIL_INSTEAD_OF_HASH_BYTES)
            # On a local disk, a whole uncompressed chunk that spans several boxes is read
            # as its object into a reused buffer (`ArrayReadJob.chunk_prefix`).
            spanning = (job.chunk_prefix is not None and job.store is not None
                        and job.crc32c is not None
                        and job.spec["kvstore"].get("driver") == "file")
            chunk_bytes = math.prod(job.chunk_shape) * job.dtype.itemsize
            for cr in plan:
                if spanning and not cr.into_one_box and \
                        box_shape(cr.box) == tuple(job.chunk_shape):
                    assert job.store is not None
                    key = f"{job.chunk_prefix}/{chunk_key(cr.coord)}"
                    window.make_room(2 * chunk_bytes)  # the read before may give a buffer
                    buffer = buffers.take(chunk_bytes + 4)
                    window.add(job.store.read_async(key, max_bytes=chunk_bytes + 4,
                                                    into=memoryview(buffer.data)),
                               2 * chunk_bytes,
                               functools.partial(_land_spanning, job, out, cr, key, buffers,
                                                 buffer))
                    continue
                buffers.drop()  # a TensorStore read: no buffer waits beside it
                source = array[to_slices(cr.box)]
                tail = None
                if cr.into_one_box:
                    # A chunk inside one target box is decoded and placed by TensorStore's
                    # threads: no array comes back, nothing is copied on this thread.
                    piece = cr.pieces[0]
                    target = out[piece.target][piece.dst]
                    pending: Any = ts.array(out[piece.target], copy=False,
                                            write=True)[piece.dst].write(source)
                    if (kvstore is not None
                            and (tail_always or not target.flags.c_contiguous)
                            and box_shape(cr.box) == tuple(job.chunk_shape)):
                        # Hashing a strided region would need a copy of it first.
                        tail = kvstore.read(chunk_key(cr.coord), byte_range=slice(-4, None))
                else:
                    pending = source.read()
                # The stored bytes and the decoded chunk (TensorStore decodes into a chunk
                # buffer of its own even when it then copies into our target).
                window.add(pending, 2 * box_size(cr.box) * job.dtype.itemsize,
                           functools.partial(_land, job, out, cr, tail, deadline))
        window.drain()
    finally:
        window.settle()
    return outputs
