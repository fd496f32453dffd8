"""``ckpt reshard``: rewrite a checkpoint into the chunk layout of another mesh, offline.

Runs on one machine with no accelerators and never builds whole arrays: it walks the new
chunk grid, reads each new chunk's box from the source through TensorStore (source chunks
are cached within a bounded pool, so one read serves neighbouring boxes) and writes it, with
host memory bounded by ``memory_budget``. The layout planning is pure (`restore`'s
`spec_shard_shape` and the save path's `choose_chunk_shape`); the result is committed with
the same protocol as a save, so it is an ordinary checkpoint.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ckpt._commit import commit
from ckpt._format import (
    ARRAYS,
    COMMIT,
    LeafRecord,
    encode_host_report,
    host_report_key,
    zarr_spec,
)
from ckpt._leaves import dtype_from_name
from ckpt._ownership import choose_chunk_shape
from ckpt._restore import open_checkpoint
from ckpt._save import ChunkWriter, new_attempt_id
from ckpt._tree import KeyPath, keystr
from ckpt.errors import CheckpointExistsError, MeshMismatchError
from restore import (
    Window,
    box_size,
    chunk_box,
    grid_shape,
    spec_shard_shape,
    to_slices,
    unflat_index,
)
from restore._read import open_spec
from storage import open_store

DEFAULT_BUDGET = 1 << 30
Spec = tuple[str | tuple[str, ...] | None, ...]


def parse_mesh(text: str) -> dict[str, int]:
    """Parses ``data=2,model=4`` (axis names in mesh order).

    Raises:
        ValueError: naming the part that does not parse.
    """
    mesh: dict[str, int] = {}
    for part in text.split(","):
        name, eq, size = part.strip().partition("=")
        if not eq or not name.isidentifier() or not size.strip().isdigit() \
                or int(size) < 1 or name in mesh:
            raise ValueError(f"mesh {text!r}: cannot parse {part.strip()!r}; expected "
                             "NAME=SIZE,NAME=SIZE (e.g. data=2,model=4)")
        mesh[name] = int(size)
    return mesh


def parse_spec(text: str) -> Spec:
    """Parses a PartitionSpec: ``data,model``; ``-``/``None`` for an unsharded dimension;
    ``data+model`` for several axes on one dimension; ``-`` or empty alone: replicated."""
    if text.strip() in ("", "-", "None"):
        return ()
    out: list[str | tuple[str, ...] | None] = []
    for entry in text.split(","):
        entry = entry.strip()
        if entry in ("-", "None", ""):
            out.append(None)
        elif "+" in entry:
            axes = tuple(a.strip() for a in entry.split("+"))
            if not all(a.isidentifier() for a in axes):
                raise ValueError(f"spec {text!r}: bad axis list {entry!r}")
            out.append(axes)
        elif entry.isidentifier():
            out.append(entry)
        else:
            raise ValueError(f"spec {text!r}: bad entry {entry!r}")
    return tuple(out)


def slash_path(path: KeyPath) -> str:
    """The key path as ``params/dense/kernel`` (positions as numbers), for glob rules."""
    return "/".join(str(value) for _, value in path)


@dataclasses.dataclass(frozen=True)
class ReshardResult:
    """What `reshard` wrote."""

    url: str
    chunks: int
    nbytes: int


def _plan(manifest_leaves: list[LeafRecord], mesh: dict[str, int],
          rules: Sequence[tuple[str, Spec]], max_chunk: int) -> list[LeafRecord]:
    records, errors = [], []
    for rec in manifest_leaves:
        new = dataclasses.replace(rec)
        records.append(new)
        if rec.kind not in ("array", "inline"):
            continue
        spec: Spec = ()
        matched = [s for pattern, s in rules if fnmatch.fnmatchcase(slash_path(rec.path), pattern)]
        if matched:
            spec = matched[-1]
        else:
            spec = rec.spec_entries()
        try:
            shard = spec_shard_shape(rec.shape, mesh, spec)
        except ValueError as exc:
            errors.append(f"{keystr(rec.path)} {list(rec.shape)}: {exc}")
            continue
        if rec.source == "jax":
            new.mesh_shape, new.mesh_axes = tuple(mesh.values()), tuple(mesh)
            new.spec = [e if e is None or isinstance(e, str) else list(e) for e in spec]
        if rec.kind == "array":
            itemsize = dtype_from_name(rec.dtype, keystr(rec.path)).itemsize
            new.chunk_shape = choose_chunk_shape(shard, itemsize, 1, max_chunk_bytes=max_chunk)
            grid = grid_shape(rec.shape, new.chunk_shape)
            count = int(np.prod(grid, dtype=np.int64))
            new.writers = [0] * count
            new.chunk_crc32c = [0] * count
            new.chunk_nbytes = [box_size(chunk_box(unflat_index(f, grid), new.chunk_shape,
                                                   rec.shape)) * itemsize for f in range(count)]
    if errors:
        raise MeshMismatchError(f"cannot lay out on mesh {mesh}: " + "; ".join(errors))
    return records


def reshard(src_url: str | os.PathLike[str], dst_url: str | os.PathLike[str], *,
            mesh: dict[str, int], rules: Sequence[tuple[str, Spec]] = (),
            memory_budget: int = DEFAULT_BUDGET, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None) -> ReshardResult:
    """Writes the checkpoint at ``src_url`` to ``dst_url`` in the layout of ``mesh``.

    Args:
        mesh: axis name -> size, in mesh order.
        rules: (glob over ``slash_path``, spec) pairs; the last match wins; leaves no rule
            matches keep their saved PartitionSpec (unsharded if they had none).
        memory_budget: bound on host memory for chunk data in flight and cached.
        overwrite: replace a committed checkpoint at ``dst_url`` (atomically).

    Raises:
        CheckpointNotFoundError: ``src_url`` holds no committed checkpoint.
        CheckpointExistsError: ``dst_url`` holds one and not ``overwrite``.
        MeshMismatchError: a spec names an axis the mesh lacks, or a dimension is not
            divisible; nothing is written.
    """
    src, dst = open_store(src_url), open_store(dst_url)
    _, manifest = open_checkpoint(src)
    max_chunk = max(1 << 20, min(16 << 20, memory_budget // 8))
    records = _plan(manifest.leaves, mesh, rules, max_chunk)
    dst.verify_access()
    if not overwrite and dst.exists(COMMIT):
        raise CheckpointExistsError(f"{dst.url} already holds a committed checkpoint "
                                    "(use --overwrite to replace it)")
    attempt = new_attempt_id()
    # A bounded cache of decoded source chunks: one read serves every new chunk it overlaps.
    src_ctx = ts.Context({"cache_pool": {"total_bytes_limit": memory_budget // 4}},
                         parent=src.tensorstore_context())
    dst_ctx = dst.tensorstore_context()
    # Budget split: a quarter each for the source-chunk cache, reads in flight (a read holds
    # its box and, while decoding, the source chunks under it), and writes in flight (a
    # write holds the chunk and its encoded copy).
    writer = ChunkWriter(memory_budget // 8)
    read_limit = memory_budget // 4
    total = sum(r.nbytes for r in records if r.kind == "array")
    done = chunks = 0
    for old, new in zip(manifest.leaves, records):
        if new.kind != "array":
            continue
        source = ts.open(open_spec(src.kvstore_spec(f"{manifest.attempt}/{ARRAYS}/{old.name}")),
                         context=src_ctx).result()
        target = ts.open(zarr_spec(dst.kvstore_spec(f"{attempt}/{ARRAYS}/{new.name}"), new,
                                   create=True), context=dst_ctx).result()
        grid = grid_shape(new.shape, new.chunk_shape)
        window = Window(read_limit)

        def land(flat: int, slices: tuple[slice, ...], fut: Any) -> None:
            nonlocal done, chunks
            data = fut.result()
            writer.put(target, slices, data, new.name, flat)
            done += data.nbytes
            chunks += 1
            if progress is not None:
                progress(done, total)

        source_chunk = box_size(tuple((0, c) for c in old.chunk_shape)) * \
            dtype_from_name(old.dtype, keystr(old.path)).itemsize
        for flat, nbytes in enumerate(new.chunk_nbytes):
            slices = to_slices(chunk_box(unflat_index(flat, grid), new.chunk_shape, new.shape))
            # A read holds its box and, while decoding, the source chunk under it.
            window.add(source[slices].read(), nbytes + source_chunk,
                       functools.partial(land, flat, slices))
        window.drain()
    rows = writer.finish()
    by_name = {r.name: r for r in records if r.kind == "array"}
    for name, flat, _, crc in rows:
        by_name[name].chunk_crc32c[flat] = crc
    dst.write(host_report_key(attempt, 0), encode_host_report(attempt, 0, rows))
    commit(dst, attempt=attempt, records=records, metadata=manifest.metadata,
           created_at=time.time(), process_count=1, overwrite=overwrite)
    return ReshardResult(dst.url, chunks, done)
